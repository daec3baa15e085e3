// Browser client: microphone -> AudioWorklet (16 kHz PCM16) -> WebSocket (binary frames, our protocol extension);
// server events -> the page: VAD state, each user turn, each answer as it streams (elements with class "assistant"),
// per-turn latency, errors in plain words, and a wake-word toggle (our extension: session.audio.input.wake_word; the
// toggle shows the server's setting and changes it). No build step: plain ES modules served by the server at GET /.
import { MODEL_RATE_HZ } from "./downsample.js";

const $ = (id) => document.getElementById(id);
const ui = {
  start: $("start"), stop: $("stop"), vad: $("vad"), connection: $("connection"), error: $("error"), log: $("log"),
  wake: $("wake"), wakeName: $("wake-name"),
};
let wakeTouched = false; // the user changed the toggle before connecting: the first session.update carries it

let session = null; // the running capture + connection, or null

function showError(text) {
  ui.error.textContent = text;
}

function setVad(state, label = state) {
  ui.vad.dataset.state = state;
  ui.vad.textContent = label;
}

function addTurn(cls, text) {
  const el = document.createElement("div");
  el.className = `turn ${cls}`;
  el.textContent = text;
  ui.log.append(el);
  el.scrollIntoView({ block: "end" });
  return el;
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

function sendWakeWord() {
  wakeTouched = true;
  if (session && session.ws.readyState === WebSocket.OPEN) {
    const update = { type: "realtime", audio: { input: { wake_word: wakeWordSetting() } } };
    session.ws.send(JSON.stringify({ type: "session.update", session: update }));
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

// One conversation: turn bookkeeping driven by server events (mirrors clients/common.py TurnView).
class Conversation {
  constructor() {
    this.userEl = null; // element of the user turn being spoken / transcribed
    this.answerEl = null; // element of the answer streaming now
    this.answerText = null;
    this.turnEndMs = null; // performance.now() when the user's speech ended
    this.activeResponse = null;
  }

  handle(ev) {
    switch (ev.type) {
      case "session.created":
      case "session.updated":
        showWakeWord(ev.session);
        listening();
        break;
      case "input_audio_buffer.wake_word_detected":
        setVad("wake", `heard “${ev.name}”`);
        addTurn("wake", `heard “${ev.name}”`);
        break;
      case "input_audio_buffer.speech_started":
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
      case "response.created":
        this.activeResponse = ev.response && ev.response.id;
        if (this.userEl) this.userEl.classList.remove("pending");
        this.userEl = null;
        this.answerEl = addTurn("assistant", "");
        this.answerText = document.createElement("span");
        this.answerEl.append(this.answerText);
        break;
      case "response.output_text.delta":
      case "response.text.delta":
        if (!this.answerEl) break;
        if (this.answerText.textContent === "" && this.turnEndMs !== null) {
          const ms = Math.round(performance.now() - this.turnEndMs);
          this.answerEl.dataset.latencyMs = String(ms);
          this.latencyNote(`first words after ${ms} ms`);
        }
        setVad("answering");
        this.answerText.textContent += ev.delta;
        break;
      case "response.done":
        this.finishAnswer(ev.response || {});
        break;
      case "error":
        showError(`The assistant reported a problem: ${(ev.error && ev.error.message) || "unknown error"}`);
        break;
    }
  }

  latencyNote(text) {
    let note = this.answerEl.querySelector(".latency");
    if (!note) {
      note = document.createElement("small");
      note.className = "latency";
      this.answerEl.append(note);
    }
    note.textContent = text;
  }

  finishAnswer(response) {
    this.activeResponse = null;
    if (this.answerEl) {
      const parts = [];
      if (this.answerEl.dataset.latencyMs) parts.push(`first words after ${this.answerEl.dataset.latencyMs} ms`);
      const t = response.timings_ms || {};
      if (t.total !== undefined) parts.push(`server ${Math.round(t.total)} ms`);
      if (response.status && response.status !== "completed") parts.push(response.status);
      if (parts.length) this.latencyNote(parts.join(" · "));
      this.answerEl.dataset.status = response.status || "completed";
    }
    this.answerEl = null;
    this.turnEndMs = null;
    listening();
  }
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
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
  } catch (err) {
    showError(microphoneError(err));
    ui.start.disabled = false;
    return;
  }
  // The context runs at the device's own rate; the worklet downsamples to 16 kHz itself (Firefox refuses to
  // connect a microphone to a context at a different rate, so we do not ask the browser for 16 kHz).
  const context = new AudioContext();
  let capture;
  try {
    await context.audioWorklet.addModule(new URL("./capture-worklet.js", import.meta.url));
    const source = context.createMediaStreamSource(stream);
    capture = new AudioWorkletNode(context, "pcm16-capture", { numberOfInputs: 1, numberOfOutputs: 1 });
    const mute = context.createGain();
    mute.gain.value = 0; // the graph must reach the destination to be rendered; we do not want to hear ourselves
    source.connect(capture).connect(mute).connect(context.destination);
  } catch (err) {
    stream.getTracks().forEach((t) => t.stop()); // release the microphone: nothing will read it
    context.close();
    throw err;
  }

  const token = new URLSearchParams(location.search).get("token");
  const protocols = token ? ["realtime", `openai-insecure-api-key.${token}`] : undefined;
  const ws = new WebSocket(serverUrl(), protocols);
  ws.binaryType = "arraybuffer";
  const conversation = new Conversation();
  session = { stream, context, capture, ws, conversation, stopping: false };
  ui.connection.textContent = "connecting…";

  ws.onopen = () => {
    ui.connection.textContent = `connected (${context.sampleRate} Hz mic → ${MODEL_RATE_HZ} Hz)`;
    const update = { type: "realtime", output_modalities: ["text"], input_sample_rate: MODEL_RATE_HZ };
    if (wakeTouched) update.audio = { input: { wake_word: wakeWordSetting() } }; // else: the server's default
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
  const { stream, context, capture } = session;
  capture.port.postMessage("stop");
  capture.port.onmessage = null;
  stream.getTracks().forEach((t) => t.stop());
  context.close();
  session = null;
  ui.start.disabled = false;
  ui.stop.disabled = true;
  ui.connection.textContent = "not connected";
  setVad("idle");
}

function stop() {
  if (!session) return;
  session.stopping = true;
  const { ws, conversation } = session;
  if (ws.readyState === WebSocket.OPEN) {
    if (conversation.activeResponse) ws.send(JSON.stringify({ type: "response.cancel" }));
    ws.close(1000, "stopped by the user");
  } else {
    ws.onclose = null; // still connecting: nothing to report when it closes
    ws.close();
    teardown();
  }
}

ui.start.addEventListener("click", () => {
  start().catch((err) => {
    showError(`Something went wrong while starting: ${err && err.message ? err.message : err}`);
    teardown();
    ui.start.disabled = false;
  });
});
ui.stop.addEventListener("click", stop);
ui.wake.addEventListener("change", sendWakeWord);
ui.wakeName.addEventListener("change", () => {
  if (ui.wake.checked) sendWakeWord();
});
