// Browser client: microphone (echo cancellation and noise suppression asked of the browser) -> AudioWorklet (16 kHz
// PCM16) -> WebSocket (binary frames, our protocol extension); server events -> the page: what the assistant is
// doing in plain words (listening, hearing you, thinking, speaking), a microphone level meter, each user turn, each
// answer as it streams (elements with class "assistant"), spoken answers played as they stream (player.js), text a
// voice cannot say shown with a note, errors in plain words, and the wake-word and speak-answers toggles.
// Talking over a spoken answer (the server's speech_started while it plays) or "Stop speaking" (Esc) stops it at
// once and tells the server how much was heard (conversation.item.truncate). Rates and timings are in the Details
// disclosure only; window.voiceAssistant holds the same facts for tests. No build step: plain ES modules, GET /.
import { MODEL_RATE_HZ } from "./downsample.js";
import { Player, decodePcm16 } from "./player.js";

const OPENAI_RATE_HZ = 24000; // the answer audio's rate when the session states none
const LEVEL_INTERVAL_MS = 100;
const $ = (id) => document.getElementById(id);
const ui = {
  start: $("start"), stop: $("stop"), interrupt: $("interrupt"), vad: $("vad"), level: $("level"),
  connection: $("connection"), audioStats: $("audio-stats"), timings: $("timings"), error: $("error"), log: $("log"),
  wake: $("wake"), wakeName: $("wake-name"), speak: $("speak"), speakNote: $("speak-note"), language: $("language"),
};
const AUDIO_DELTAS = ["response.output_audio.delta", "response.audio.delta"];
const TEXT_DELTAS = [
  "response.output_text.delta", "response.text.delta",
  "response.output_audio_transcript.delta", "response.audio_transcript.delta",
];
const NOT_SPOKEN = {
  no_voice_for_language: "shown as text: there is no voice for this language",
  speech_failed: "shown as text: the voice could not say this",
};

// What the page did, for tests and curious people (the Details disclosure shows the same numbers).
const debug = (window.voiceAssistant = { states: [], truncates: [], truncated: [], maxLevel: 0, audio: null });
let wakeTouched = false; // the wake-word toggle changed before connecting: the first session.update says so
let session = null; // the running capture, playback and connection, or null

function showError(text) {
  ui.error.textContent = text;
}

function setVad(state, label = state) {
  ui.vad.dataset.state = state;
  ui.vad.textContent = label;
  if (debug.states[debug.states.length - 1] !== state) debug.states.push(state);
  ui.interrupt.disabled = state !== "speaking";
}

function addTurn(cls, text) {
  const el = document.createElement("div");
  el.className = `turn ${cls}`;
  el.textContent = text;
  ui.log.append(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

// The language the user speaks (OpenAI's transcription language): the recogniser is told it, not left to detect it.
function transcriptionSetting() {
  return ui.language.value ? { model: "whisper-1", language: ui.language.value } : null;
}

function showLanguage(sessionObj) {
  const input = sessionObj && sessionObj.audio && sessionObj.audio.input;
  const tr = input ? input.transcription : sessionObj && sessionObj.input_audio_transcription;
  ui.language.dataset.server = (tr && tr.language) || ""; // what the server has now
}

function wakeWordSetting() {
  return ui.wake.checked ? { name: ui.wakeName.value } : null;
}

function listening() {
  const phrase = ui.wake.checked ? ui.wakeName.options[ui.wakeName.selectedIndex].text : null;
  setVad("listening", phrase ? `say “${phrase}”` : "listening");
}

function showWakeWord(sessionObj) {
  // Both dialects: GA nests it under audio.input, beta has it at the top level.
  const input = sessionObj && sessionObj.audio && sessionObj.audio.input;
  const w = input ? input.wake_word : sessionObj && sessionObj.wake_word;
  ui.wake.checked = Boolean(w);
  ui.wake.dataset.server = w ? w.name : ""; // what the server has now
  if (w) ui.wakeName.value = w.name;
}

function sendUpdate(update) {
  if (session && session.ws.readyState === WebSocket.OPEN) {
    session.ws.send(JSON.stringify({ type: "session.update", session: { type: "realtime", ...update } }));
  }
}

function serverUrl() {
  // Same host and port as the page; wss when the page came over https.
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  return `${scheme}://${location.host}/v1/realtime`;
}

function microphoneError(err) {
  switch (err && err.name) {
    case "NotAllowedError":
    case "SecurityError":
      return "The browser was not allowed to use the microphone. Allow microphone access for this page and press Start again.";
    case "NotFoundError":
    case "OverconstrainedError":
      return "No microphone was found. Connect one and press Start again.";
    case "NotReadableError":
      return "The microphone is in use by another program or could not be opened. Close the other program and press Start again.";
    default:
      return `The microphone could not be started: ${err && err.message ? err.message : err}`;
  }
}

// One conversation: turn bookkeeping driven by server events (mirrors clients/common.py TurnView), and the spoken
// answers' playback (mirrors clients/playback.py SpokenAnswers).
class Conversation {
  constructor(send, player) {
    this.send = send; // (event) => void
    this.player = player;
    debug.aheadMs = () => player.aheadMs(); // answer audio scheduled but not heard yet (tests)
    this.userEl = null; // element of the user turn being spoken / transcribed
    this.answerEl = null; // element of the answer streaming now
    this.answerText = null;
    this.turnEndMs = null; // performance.now() when the user's speech ended
    this.activeResponse = null;
    this.outputRateHz = null; // the session's answer audio rate; null: the server has no voice
    this.answers = 0;
    player.onidle = () => {
      this.showAudioStats();
      this.listenUnlessBusy();
    };
  }

  handle(ev) {
    if (AUDIO_DELTAS.includes(ev.type)) return this.playAudio(ev);
    if (TEXT_DELTAS.includes(ev.type)) return this.addText(ev);
    switch (ev.type) {
      case "session.created":
      case "session.updated":
        showWakeWord(ev.session);
        showLanguage(ev.session);
        this.showVoice(ev.session);
        this.listenUnlessBusy();
        break;
      case "input_audio_buffer.wake_word_detected":
        setVad("wake", `heard “${ev.name}”`);
        addTurn("wake", `heard “${ev.name}”`);
        break;
      case "input_audio_buffer.speech_started":
        // barge-in: the listener talks over the answer, also in a gap between two of its clauses (nothing unheard
        // to truncate then, but audio still in flight for it must not play)
        if (this.player.playing || this.activeResponse) this.cut();
        setVad("speech", "hearing you");
        this.userEl = addTurn("user pending", "…");
        break;
      case "input_audio_buffer.speech_stopped":
        setVad("thinking");
        this.turnEndMs = performance.now();
        break;
      case "input_audio_buffer.committed":
        if (!this.userEl) this.userEl = addTurn("user pending", "…");
        this.userEl.dataset.itemId = ev.item_id;
        this.userEl.textContent = "(spoken question)"; // replaced by the transcript when the server has one
        break;
      case "conversation.item.input_audio_transcription.completed": {
        const el = this.userEl && this.userEl.dataset.itemId === ev.item_id ? this.userEl : addTurn("user", "");
        el.classList.remove("pending");
        el.textContent = ev.transcript;
        break;
      }
      case "input_audio_buffer.cleared":
        this.userEl = null; // that turn will not be answered
        this.listenUnlessBusy();
        break;
      case "conversation.item.truncated":
        debug.truncated.push({ itemId: ev.item_id, audioEndMs: ev.audio_end_ms });
        break;
      case "response.created":
        this.activeResponse = ev.response && ev.response.id;
        if (this.userEl) this.userEl.classList.remove("pending");
        this.userEl = null;
        this.answerEl = addTurn("assistant", "");
        this.answerText = document.createElement("span");
        this.answerEl.append(this.answerText);
        break;
      case "response.done":
        this.finishAnswer(ev.response || {});
        break;
      case "error":
        showError(`The assistant reported a problem: ${(ev.error && ev.error.message) || "unknown error"}`);
        break;
    }
  }

  showVoice(sessionObj) {
    const rate = sessionObj && sessionObj.output_sample_rate;
    this.outputRateHz = Number.isInteger(rate) ? rate : null;
    ui.speak.disabled = this.outputRateHz === null;
    ui.speakNote.textContent = ui.speak.disabled ? " (this assistant has no voice: it answers in text)" : "";
    const modalities = (sessionObj && (sessionObj.output_modalities || sessionObj.modalities)) || [];
    ui.speak.checked = modalities.includes("audio");
    ui.connection.textContent = session ? session.connectionNote(this.outputRateHz) : "not connected";
  }

  playAudio(ev) {
    if (!this.answerEl) return;
    this.firstWords();
    this.player.play(ev.item_id, decodePcm16(ev.delta), this.outputRateHz || OPENAI_RATE_HZ);
    this.answerEl.dataset.spoken = "true";
    setVad("speaking");
  }

  addText(ev) {
    if (!this.answerEl) return;
    this.firstWords();
    // A spoken clause's text comes just before its audio; text without audio (or a text answer) is the answer.
    // Once the answer speaks it is "speaking" until it is done, also in a gap between two clauses.
    if (!this.answerEl.dataset.spoken) setVad(ev.type.includes("audio") && !ev.no_audio ? "thinking" : "answering");
    this.answerText.textContent += ev.delta;
    const why = ev.no_audio && (NOT_SPOKEN[ev.no_audio.code] || "shown as text, not spoken");
    if (why && !this.answerEl.querySelector(".note")) this.note(`(${why})`);
  }

  firstWords() {
    if (this.answerEl.dataset.latencyMs || this.turnEndMs === null) return;
    this.answerEl.dataset.latencyMs = String(Math.round(performance.now() - this.turnEndMs));
  }

  // Stop the answer now and tell the server how much of it was heard.
  cut() {
    for (const { itemId, heardMs } of this.player.stop()) {
      const event = { type: "conversation.item.truncate", item_id: itemId, content_index: 0, audio_end_ms: heardMs };
      debug.truncates.push({ itemId, audioEndMs: heardMs });
      this.send(event);
    }
    this.showAudioStats();
  }

  // "Stop speaking" / Esc: stop generating (when it still is) and cut to what was heard.
  interrupt() {
    if (this.activeResponse) this.send({ type: "response.cancel" });
    this.cut();
    this.listenUnlessBusy();
  }

  showAudioStats() {
    const s = this.player.stats;
    debug.audio = { ...s };
    ui.audioStats.textContent = `Answer audio: ${Math.round(s.receivedMs)} ms received, ${Math.round(s.playedMs)} ms played`;
  }

  finishAnswer(response) {
    this.activeResponse = null;
    if (this.answerEl) {
      this.answers += 1;
      const parts = [];
      if (this.answerEl.dataset.latencyMs) parts.push(`first words after ${this.answerEl.dataset.latencyMs} ms`);
      const t = response.timings_ms || {};
      if (t.first_audio !== undefined) parts.push(`first audio ${Math.round(t.first_audio)} ms after the start`);
      if (t.total !== undefined) parts.push(`server ${Math.round(t.total)} ms`);
      parts.push(response.status || "completed");
      const li = document.createElement("li");
      li.textContent = `Answer ${this.answers}: ${parts.join(" · ")}`;
      ui.timings.append(li);
      this.answerEl.dataset.status = response.status || "completed";
      if (response.status === "cancelled") this.note("(interrupted)");
    }
    this.answerEl = null;
    this.turnEndMs = null;
    this.showAudioStats();
    this.listenUnlessBusy();
  }

  // Back to "listening", unless an answer is still coming or playing, or the user is in the middle of a turn.
  listenUnlessBusy() {
    if (!this.activeResponse && !this.player.playing && !this.userEl) listening();
  }

  note(text) {
    const note = document.createElement("small");
    note.className = "note";
    note.textContent = text;
    this.answerEl.append(note);
  }
}

function startLevelMeter(context, source) {
  const analyser = context.createAnalyser();
  analyser.fftSize = 1024;
  source.connect(analyser);
  const samples = new Float32Array(analyser.fftSize);
  return setInterval(() => {
    analyser.getFloatTimeDomainData(samples);
    let sum = 0;
    for (const x of samples) sum += x * x;
    const db = 10 * Math.log10(sum / samples.length + 1e-10); // dBFS
    const level = Math.min(1, Math.max(0, (db + 60) / 60)); // -60 dBFS (quiet room) .. 0 dBFS
    ui.level.value = level;
    ui.level.textContent = level > 0.15 ? "sound" : "silent";
    debug.maxLevel = Math.max(debug.maxLevel, level);
  }, LEVEL_INTERVAL_MS);
}

async function start() {
  showError("");
  if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    showError(
      "The microphone needs https or localhost: browsers only allow microphone access on secure pages. " +
        `Open this page as https://… (set server.tls_cert/tls_key) or as http://localhost:${location.port || 80}/.`
    );
    return;
  }
  ui.start.disabled = true;
  setVad("connecting", "starting…");
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
  } catch (err) {
    showError(microphoneError(err));
    ui.start.disabled = false;
    setVad("idle", "press Start");
    return;
  }
  // The context runs at the device's own rate; the worklet downsamples to 16 kHz itself (Firefox refuses to
  // connect a microphone to a context at a different rate, so we do not ask the browser for 16 kHz).
  const context = new AudioContext();
  let capture, levelTimer;
  try {
    await context.audioWorklet.addModule(new URL("./capture-worklet.js", import.meta.url));
    const source = context.createMediaStreamSource(stream);
    capture = new AudioWorkletNode(context, "pcm16-capture", { numberOfInputs: 1, numberOfOutputs: 1 });
    const mute = context.createGain();
    mute.gain.value = 0; // the graph must reach the destination to be rendered; we do not want to hear ourselves
    source.connect(capture).connect(mute).connect(context.destination);
    levelTimer = startLevelMeter(context, source);
  } catch (err) {
    stream.getTracks().forEach((t) => t.stop()); // release the microphone: nothing will read it
    context.close();
    throw err;
  }

  const token = new URLSearchParams(location.search).get("token");
  const protocols = token ? ["realtime", `openai-insecure-api-key.${token}`] : undefined;
  const ws = new WebSocket(serverUrl(), protocols);
  ws.binaryType = "arraybuffer";
  const send = (event) => {
    if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(event));
  };
  const conversation = new Conversation(send, new Player(context));
  const connectionNote = (rate) =>
    `connected (${context.sampleRate} Hz mic → ${MODEL_RATE_HZ} Hz)` + (rate ? `; answers spoken at ${rate} Hz` : "; text answers");
  session = { stream, context, capture, ws, conversation, levelTimer, connectionNote, stopping: false };
  setVad("connecting", "connecting…");

  ws.onopen = () => {
    ui.connection.textContent = connectionNote(null);
    const update = { type: "realtime", input_sample_rate: MODEL_RATE_HZ };
    const input = {};
    if (wakeTouched) input.wake_word = wakeWordSetting(); // else: the server's default
    if (ui.language.value) input.transcription = transcriptionSetting(); // else: detected per turn
    if (Object.keys(input).length) update.audio = { input };
    if (!ui.speak.checked) update.output_modalities = ["text"]; // else: spoken when the server has a voice
    ws.send(JSON.stringify({ type: "session.update", session: update }));
    capture.port.onmessage = (e) => {
      if (ws.readyState === WebSocket.OPEN) ws.send(e.data);
    };
    ui.stop.disabled = false;
  };
  ws.onmessage = (e) => {
    if (typeof e.data === "string") conversation.handle(JSON.parse(e.data));
  };
  ws.onerror = () => {}; // the close event that follows carries the useful information
  ws.onclose = (e) => {
    const wasStopping = session && session.stopping;
    teardown();
    if (!wasStopping) {
      const why = e.code === 1006 ? "the server could not be reached or went away" : `${e.reason || "closed"} (code ${e.code})`;
      showError(`Lost the connection to the assistant: ${why}. Press Start to try again.`);
    }
  };
}

function teardown() {
  if (!session) return;
  const { stream, context, capture, levelTimer, conversation } = session;
  conversation.player.stop();
  clearInterval(levelTimer);
  capture.port.postMessage("stop");
  capture.port.onmessage = null;
  stream.getTracks().forEach((t) => t.stop());
  context.close();
  session = null;
  ui.start.disabled = false;
  ui.stop.disabled = true;
  ui.level.value = 0;
  if (ui.speak.disabled) {
    ui.speak.disabled = false; // that server had no voice; the next one may
    ui.speak.checked = true;
    ui.speakNote.textContent = "";
  }
  ui.connection.textContent = "not connected";
  setVad("idle", "press Start");
}

function stop() {
  if (!session) return;
  session.stopping = true;
  const { ws, conversation } = session;
  if (ws.readyState === WebSocket.OPEN) {
    if (conversation.player.playing) conversation.interrupt();
    else if (conversation.activeResponse) ws.send(JSON.stringify({ type: "response.cancel" }));
    ws.close(1000, "stopped by the user");
  } else {
    ws.onclose = null; // still connecting: nothing to report when it closes
    ws.close();
    teardown();
  }
}

function interrupt() {
  if (session && session.conversation.player.playing) session.conversation.interrupt();
}

ui.start.addEventListener("click", () => {
  start().catch((err) => {
    showError(`Something went wrong while starting: ${err && err.message ? err.message : err}`);
    teardown();
    ui.start.disabled = false;
  });
});
ui.stop.addEventListener("click", stop);
ui.interrupt.addEventListener("click", interrupt);
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape") interrupt();
});
ui.wake.addEventListener("change", () => {
  wakeTouched = true;
  sendUpdate({ audio: { input: { wake_word: wakeWordSetting() } } });
});
ui.wakeName.addEventListener("change", () => {
  if (!ui.wake.checked) return;
  wakeTouched = true;
  sendUpdate({ audio: { input: { wake_word: wakeWordSetting() } } });
});
ui.language.addEventListener("change", () => {
  sendUpdate({ audio: { input: { transcription: transcriptionSetting() } } });
});
ui.speak.addEventListener("change", () => {
  sendUpdate({ output_modalities: [ui.speak.checked ? "audio" : "text"] });
});
