// A spoken conversation with the voice assistant through OpenAI's Agents SDK (`@openai/agents-realtime`): a
// `RealtimeSession` over the `OpenAIRealtimeWebSocket` transport, with the SDK's default session (semantic VAD,
// `gpt-4o-mini-transcribe`, audio output, later `tracing: "auto"`), unchanged.
//
//   node agents_conversation.cjs ws://HOST:8765/v1/realtime question.pcm [question2.pcm ...]
//   AGENTS_TOOLS=weather node agents_conversation.cjs ...   (the agent gets a get_weather tool)
//
// question.pcm: PCM16 mono 24 kHz (espeak-ng + sox, as for realtime_conversation.cjs). Each question is sent as the
// microphone would, in 100 ms chunks, followed by silence until the server's turn detection ends the turn and the
// answer is done, and for as long as the answer's audio plays (a listener asks the next question after hearing it,
// so the SDK's playback clock does not cut the answer short). Prints one JSON line per answer, then one with every server event type, every `error` event and
// every client event type the SDK sent and every tool call the SDK ran (tests/test_agents_sdk.py). A turn that the
// model answers with a function call is finished by the SDK itself (it runs the tool, sends its output and asks
// for the answer): that turn's printed answer is the one after the call.
// AGENTS_DEBUG=1 prints every event sent and received (deltas excepted) on stderr.
const fs = require("node:fs");
const { RealtimeAgent, RealtimeSession, OpenAIRealtimeWebSocket, tool } = require("@openai/agents-realtime");

const CHUNK_BYTES = 4800; // 100 ms of PCM16 at 24 kHz
const toolCalls = []; // {name, args} of every tool the SDK ran
// A fixed, made-up forecast: the test checks that the answer uses it (a temperature no model would guess).
const getWeather = tool({
  name: "get_weather",
  description: "Get the current weather in a city",
  parameters: {
    type: "object",
    properties: { city: { type: "string" } },
    required: ["city"],
    additionalProperties: false,
  },
  strict: true,
  execute: async (args) => {
    toolCalls.push({ name: "get_weather", args });
    return JSON.stringify({ city: args.city, sky: "sunny", temperature_celsius: 31 });
  },
});
const TOOLS = process.env.AGENTS_TOOLS === "weather" ? [getWeather] : [];
const ANSWER_TIMEOUT_MS = 240000;

function answerText(response) {
  const parts = response.output.flatMap((item) => item.content ?? []);
  return parts.map((part) => part.transcript ?? part.text ?? "").join("");
}

async function sendSilence(session, ms, until = () => false) {
  const silence = Buffer.alloc(CHUNK_BYTES);
  for (let sent = 0; sent < ms && !until(); sent += 100) {
    session.sendAudio(silence.buffer.slice(0, CHUNK_BYTES));
    await new Promise((resolve) => setTimeout(resolve, 100)); // paced like a microphone
  }
}

async function main() {
  const [url, ...pcmPaths] = process.argv.slice(2);
  const agent = new RealtimeAgent({
    name: "Assistant",
    instructions: "You are a helpful voice assistant. Answer in one short sentence.",
    tools: TOOLS,
  });
  const transport = new OpenAIRealtimeWebSocket({ url });
  const session = new RealtimeSession(agent, { transport, model: "local" });
  const types = [];
  const errors = [];
  const sent = [];
  const waiting = [];
  let answerAudioMs = 0; // PCM16 24 kHz audio of the current answer
  session.on("transport_event", (event) => {
    types.push(event.type);
    if (process.env.AGENTS_DEBUG && !event.type.endsWith(".delta")) console.error("got", JSON.stringify(event).slice(0, 600));
    if (event.type === "error") errors.push(event.error ?? event);
    if (event.type === "response.output_audio.delta") answerAudioMs += (event.delta.length * 3) / 4 / 48;
    // A response that is a function call is not the answer: the SDK runs the tool and asks for another response.
    const isCall = (r) => (r.output ?? []).some((item) => item.type === "function_call");
    if (event.type === "response.done" && !isCall(event.response))
      waiting.splice(0).forEach((resolve) => resolve(event.response));
  });
  session.on("error", (err) => errors.push({ message: String(err.error?.message ?? err.error ?? err) }));
  const origSend = transport.sendEvent.bind(transport);
  transport.sendEvent = (event) => {
    sent.push(event.type);
    if (process.env.AGENTS_DEBUG) console.error("sent", JSON.stringify(event).slice(0, 2000));
    return origSend(event);
  };

  await session.connect({ apiKey: "any-key", url }); // the server has no token: any key will do
  for (const pcmPath of pcmPaths) {
    answerAudioMs = 0;
    const done = new Promise((resolve) => waiting.push(resolve));
    const pcm = fs.readFileSync(pcmPath);
    for (let i = 0; i < pcm.length; i += CHUNK_BYTES) {
      const chunk = pcm.subarray(i, i + CHUNK_BYTES);
      session.sendAudio(chunk.buffer.slice(chunk.byteOffset, chunk.byteOffset + chunk.length));
    }
    // Silence until the answer is done (the server decides when the turn ended), then while it plays.
    let finished = false;
    done.then(() => (finished = true));
    await sendSilence(session, ANSWER_TIMEOUT_MS, () => finished);
    if (!finished) throw new Error(`no response.done within ${ANSWER_TIMEOUT_MS} ms; events: ${types.join(" ")}`);
    const response = await done;
    console.log(JSON.stringify({ status: response.status, text: answerText(response), audio_ms: answerAudioMs }));
    await sendSilence(session, answerAudioMs + 300);
  }
  await new Promise((resolve) => setTimeout(resolve, 500)); // late events (rate_limits.updated, retrieve answers)
  session.close();
  console.log(JSON.stringify({ types, errors, sent, tool_calls: toolCalls }));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
