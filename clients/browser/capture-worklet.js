// AudioWorklet processor: microphone samples (AudioContext rate) -> 16 kHz PCM16 blocks of 20 ms, posted to the page.
// Runs on the audio rendering thread; it only converts and batches, the page owns the WebSocket.
import { Downsampler, MODEL_RATE_HZ } from "./downsample.js";

const BLOCK_SAMPLES = (MODEL_RATE_HZ * 20) / 1000; // 320 samples = 20 ms at 16 kHz

class Pcm16Capture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.downsampler = new Downsampler(sampleRate, MODEL_RATE_HZ); // `sampleRate` is the worklet global
    this.block = new Int16Array(BLOCK_SAMPLES);
    this.filled = 0;
    this.running = true;
    this.port.onmessage = (e) => {
      if (e.data === "stop") this.running = false;
    };
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0]; // first input, first channel (mono is all the server wants)
    if (channel) {
      const pcm = this.downsampler.process(channel);
      for (let i = 0; i < pcm.length; i++) {
        this.block[this.filled++] = pcm[i];
        if (this.filled === BLOCK_SAMPLES) {
          this.port.postMessage(this.block.buffer, [this.block.buffer]); // transfer, no copy
          this.block = new Int16Array(BLOCK_SAMPLES);
          this.filled = 0;
        }
      }
    }
    return this.running;
  }
}

registerProcessor("pcm16-capture", Pcm16Capture);
