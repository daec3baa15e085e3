// Streaming downsampler: float audio at the AudioContext's rate -> 16 kHz PCM16 (what the server's VAD expects).
// Used inside the AudioWorklet (capture-worklet.js); plain ES module so tests can import it in a page too.
// A windowed-sinc low-pass (cutoff 0.45 x the output rate, so nothing above 7.2 kHz aliases into speech) evaluated at
// the fractional input position of each output sample (linear interpolation between two filtered points).

export const MODEL_RATE_HZ = 16000;

export function lowpassKernel(inRateHz, outRateHz, zeroCrossings = 16) {
  const cutoff = (0.45 * outRateHz) / inRateHz; // cycles per input sample
  const half = Math.ceil(zeroCrossings / (2 * cutoff));
  const length = 2 * half + 1;
  const kernel = new Float32Array(length);
  let sum = 0;
  for (let n = 0; n < length; n++) {
    const t = n - half;
    const sinc = t === 0 ? 2 * cutoff : Math.sin(2 * Math.PI * cutoff * t) / (Math.PI * t);
    const blackman = 0.42 - 0.5 * Math.cos((2 * Math.PI * n) / (length - 1)) + 0.08 * Math.cos((4 * Math.PI * n) / (length - 1));
    kernel[n] = sinc * blackman;
    sum += kernel[n];
  }
  for (let n = 0; n < length; n++) kernel[n] /= sum; // unity gain at DC
  return kernel;
}

export class Downsampler {
  constructor(inRateHz, outRateHz = MODEL_RATE_HZ) {
    if (inRateHz < outRateHz) throw new Error(`cannot downsample ${inRateHz} Hz to ${outRateHz} Hz: input is slower`);
    this.step = inRateHz / outRateHz; // input samples per output sample
    this.passthrough = inRateHz === outRateHz;
    this.kernel = this.passthrough ? null : lowpassKernel(inRateHz, outRateHz);
    this.history = new Float32Array(0); // input not yet consumed by a full filter window
    this.pos = 0; // where the next output's filter window starts, in history coordinates (fractional)
  }

  // Float32Array (any length) -> Int16Array of 16 kHz samples (may be empty while the window fills).
  process(input) {
    if (this.passthrough) return toPcm16(input);
    const k = this.kernel;
    const buf = new Float32Array(this.history.length + input.length);
    buf.set(this.history);
    buf.set(input, this.history.length);
    const out = [];
    while (this.pos + k.length + 1 <= buf.length) {
      const i = Math.floor(this.pos);
      const frac = this.pos - i;
      const a = fir(buf, i, k);
      const b = frac > 0 ? fir(buf, i + 1, k) : a;
      out.push(a + (b - a) * frac);
      this.pos += this.step;
    }
    const consumed = Math.floor(this.pos);
    this.history = buf.slice(consumed);
    this.pos -= consumed;
    return toPcm16(out);
  }
}

function fir(buf, start, kernel) {
  let acc = 0;
  for (let n = 0; n < kernel.length; n++) acc += buf[start + n] * kernel[n];
  return acc;
}

export function toPcm16(samples) {
  const pcm = new Int16Array(samples.length);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    pcm[i] = Math.round(s * 32767);
  }
  return pcm;
}
