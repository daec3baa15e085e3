// Spoken answers in the page: each audio delta (PCM16 mono, the session's output rate, 24 kHz by default) becomes an
// AudioBuffer played by an AudioBufferSourceNode scheduled right after the previous one, so clauses play gap-free
// as they stream; the first one of a run waits JITTER_S so network jitter does not open gaps. The browser resamples
// to the device's rate. `stop()` silences everything at once and says how much of each answer was heard (the
// audio_end_ms of conversation.item.truncate), measured from what the speaker has actually output.

const JITTER_S = 0.08;
const CUT_ITEMS_KEPT = 32; // answers stopped here: audio still in flight for them is dropped

export class Player {
  constructor(context) {
    this.context = context;
    this.output = context.createGain();
    this.output.connect(context.destination);
    this.items = new Map(); // item id -> chunks [{start, duration}] (context time, s)
    this.sources = new Set(); // scheduled or playing
    this.cut = []; // ids of answers stopped here
    this.nextTime = 0; // when the next chunk starts (context time)
    this.onidle = null; // called when the last scheduled chunk has played
    this.stats = { receivedMs: 0, playedMs: 0, chunks: 0 }; // for the details view and tests
  }

  get playing() {
    return this.sources.size > 0;
  }

  // pcm: Int16Array of one delta; rateHz: its sample rate.
  play(itemId, pcm, rateHz) {
    if (!pcm.length || this.cut.includes(itemId)) return;
    const buffer = this.context.createBuffer(1, pcm.length, rateHz);
    const samples = buffer.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) samples[i] = pcm[i] / 32768;
    const source = this.context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.output);
    const now = this.context.currentTime;
    const start = this.nextTime > now ? this.nextTime : now + JITTER_S;
    source.start(start);
    this.nextTime = start + buffer.duration;
    if (!this.items.has(itemId)) this.forgetPlayed(now);
    if (!this.items.has(itemId)) this.items.set(itemId, []);
    this.items.get(itemId).push({ start, duration: buffer.duration });
    this.sources.add(source);
    this.stats.receivedMs += buffer.duration * 1000;
    this.stats.chunks += 1;
    source.onended = () => {
      this.sources.delete(source);
      this.stats.playedMs += buffer.duration * 1000;
      if (!this.playing && this.onidle) this.onidle();
    };
  }

  // Milliseconds of answer audio scheduled but not yet heard (0 in a gap between two clauses).
  aheadMs() {
    return Math.max(0, Math.round((this.nextTime - this.outputTime()) * 1000));
  }

  // Milliseconds of the answer `itemId` the listener has heard so far.
  heardMs(itemId) {
    const t = this.outputTime();
    let s = 0;
    for (const c of this.items.get(itemId) || []) s += Math.min(Math.max(t - c.start, 0), c.duration);
    return Math.round(s * 1000);
  }

  // Silence now; audio still coming for these answers is dropped. Returns [{itemId, heardMs}] for every answer
  // with audio not heard yet (an answer heard to the end of what came needs no truncation).
  stop() {
    const t = this.outputTime();
    const cut = [];
    for (const [itemId, chunks] of this.items) {
      this.cut.push(itemId);
      const last = chunks[chunks.length - 1];
      if (last.start + last.duration > t) cut.push({ itemId, heardMs: this.heardMs(itemId) });
    }
    this.cut.splice(0, Math.max(0, this.cut.length - CUT_ITEMS_KEPT));
    for (const source of this.sources) {
      source.onended = null;
      source.stop();
    }
    for (const c of cut) this.stats.playedMs += c.heardMs;
    this.sources.clear();
    this.items.clear();
    this.nextTime = 0;
    return cut;
  }

  // A new answer starts: forget answers played to their end (their times are no longer needed).
  forgetPlayed(now) {
    for (const [itemId, chunks] of this.items) {
      const last = chunks[chunks.length - 1];
      if (last.start + last.duration <= now) this.items.delete(itemId);
    }
  }

  // The context time the speaker is outputting now (what was scheduled before it has been heard).
  outputTime() {
    const ts = this.context.getOutputTimestamp ? this.context.getOutputTimestamp() : null;
    if (ts && ts.contextTime > 0) return ts.contextTime;
    return Math.max(0, this.context.currentTime - (this.context.outputLatency || this.context.baseLatency || 0));
  }
}

// base64 PCM16 little-endian -> Int16Array
export function decodePcm16(b64) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Int16Array(bytes.buffer, 0, bytes.length >> 1);
}
