// A typed turn and a spoken turn with the voice assistant through the official `openai` Node SDK (OpenAIRealtimeWS),
// which always connects with wss://: trust the server's certificate with NODE_EXTRA_CA_CERTS.
//
//   NODE_EXTRA_CA_CERTS=cert.pem node realtime_conversation.cjs https://HOST:8765/v1 TOKEN question.pcm "Typed question"
//
// question.pcm: PCM16 mono 24 kHz, e.g. espeak-ng -w q.wav "What is the capital of France?" &&
//   sox q.wav -r 24000 -c 1 -b 16 -e signed-integer q.raw
// Prints one JSON line per answer, then one with every server event type and every error (tests/test_node_sdk.py).
const fs = require("node:fs");
const { OpenAI } = require("openai");
const { OpenAIRealtimeWS } = require("openai/realtime/ws");

async function answer(rt) {
  const done = await rt.emitted("response.done"); // rejects on an `error` event
  const text = done.response.output.flatMap((item) => item.content ?? []).map((part) => part.text ?? "");
  return { status: done.response.status, text: text.join("") };
}

async function main() {
  const [baseURL, apiKey, pcmPath, question] = process.argv.slice(2);
  const client = new OpenAI({ apiKey, baseURL }); // apiKey: the server's token (anything when it has none)
  const rt = new OpenAIRealtimeWS({ model: "local" }, client);
  const types = [];
  const errors = [];
  let finished = false;
  rt.on("event", (event) => types.push(event.type));
  rt.on("error", (err) => errors.push(err.error ?? { message: err.message }));
  rt.socket.on("close", (code) => {
    if (!finished) {
      console.error(`the connection closed (${code}) before the conversation ended:`, JSON.stringify(errors));
      process.exit(1);
    }
  });

  await rt.emitted("session.created");
  rt.send({
    type: "session.update",
    session: {
      type: "realtime",
      output_modalities: ["text"], // answers as text
      audio: { input: { format: { type: "audio/pcm", rate: 24000 }, turn_detection: null } }, // push-to-talk
    },
  });
  await rt.emitted("session.updated");

  // A typed turn.
  const item = { type: "message", role: "user", content: [{ type: "input_text", text: question }] };
  rt.send({ type: "conversation.item.create", item });
  rt.send({ type: "response.create" });
  console.log(JSON.stringify({ turn: "text", ...(await answer(rt)) }));

  // A spoken turn: the audio in 100 ms appends, then commit and ask for the answer.
  const pcm = fs.readFileSync(pcmPath);
  for (let i = 0; i < pcm.length; i += 4800) {
    rt.send({ type: "input_audio_buffer.append", audio: pcm.subarray(i, i + 4800).toString("base64") });
  }
  rt.send({ type: "input_audio_buffer.commit" });
  const heard = rt.emitted("conversation.item.input_audio_transcription.completed");
  rt.send({ type: "response.create" });
  const spoken = await answer(rt);
  console.log(JSON.stringify({ turn: "audio", transcript: (await heard).transcript, ...spoken }));

  finished = true;
  rt.close();
  console.log(JSON.stringify({ types, errors }));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
