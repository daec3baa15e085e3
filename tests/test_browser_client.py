"""Browser client in a real headless Chromium (Debian's `chromium`, driven by Playwright) against a real server.

A fake microphone plays an espeak-ng question; the page must show the VAD state, the user turn and the streamed answer
(class `assistant`). With the embedded backend the answer must be right ("Paris"); a screenshot is kept under
`test-output/`. Also: the downsampler's output rate and anti-aliasing, the plain-words error on an insecure origin,
accessibility (controls of at least 44 px with names, keyboard use with a visible focus, a favicon, no rates or
timings on the main view), and spoken answers (played through Web Audio; barge-in stops them and truncates) with a
microphone the test speaks into when it wants (`getUserMedia` replaced by a Web Audio stream).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import subprocess
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from assistant.transport.server import running_server
from tests.conftest import CLIENT_TIMEOUT_S
from tests.server_util import make_cfg, tiny_qwen_cfg

REPO = Path(__file__).resolve().parent.parent
OUTPUT_DIR = REPO / "test-output"
CHROMIUM = "/usr/bin/chromium"
TIMEOUT_MS = CLIENT_TIMEOUT_S * 1000
INSECURE_HOST = "insecure.test"  # mapped to 127.0.0.1 by a resolver rule: same server, but not a secure context


@pytest.fixture(scope="module")
def mic_wav(question_wav, tmp_path_factory) -> Path:
    """The question at 16 kHz with 0.5 s silence before and 60 s after. Chromium loops the file: the long pause ends
    the turn and keeps the question's next repetition from barging in (cancelling) while the answer streams."""
    out = tmp_path_factory.mktemp("mic") / "mic.wav"
    cmd = ["sox", str(question_wav), "-r", "16000", "-c", "1", "-b", "16", str(out), "pad", "0.5", "60"]
    subprocess.run(cmd, check=True, timeout=CLIENT_TIMEOUT_S)
    return out


@pytest.fixture(scope="module")
def wake_mic_wav(tmp_path_factory) -> Path:
    """ "Alexa, what is the capital of France?" at 16 kHz, 0.5 s of silence before and 60 s after (see `mic_wav`)."""
    from bench.wake_word import clip, speak

    out = tmp_path_factory.mktemp("wake_mic") / "wake_mic.wav"
    pcm = np.concatenate([clip(speak("Alexa, what is the capital of France?")), np.zeros(60 * 16000, np.int16)])
    with wave.open(str(out), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.astype("<i2").tobytes())
    return out


@contextlib.asynccontextmanager
async def chromium(mic_wav: Path) -> AsyncIterator[object]:
    from playwright.async_api import async_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (make system-deps)")
    args = [
        "--no-sandbox",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={mic_wav}",
        "--autoplay-policy=no-user-gesture-required",
        f"--host-resolver-rules=MAP {INSECURE_HOST} 127.0.0.1",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ]
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            yield browser
        finally:
            await browser.close()


async def converse_in_browser(browser, http_url: str, screenshot: str, language: str = "") -> dict:
    """Open the page, pick `language` (the empty one: any), press Start, wait for the first finished answer; returns
    what the page shows."""
    page = await browser.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda e: page_errors.append(str(e)))
    await page.goto(http_url + "/")
    await page.select_option("#language", language)
    await page.click("#start")
    await page.wait_for_selector(f'#language[data-server="{language}"]', timeout=TIMEOUT_MS)  # the server's echo
    await page.wait_for_selector(".assistant[data-status]", timeout=TIMEOUT_MS)
    shown = await page.evaluate(
        """() => ({
            answer: document.querySelector('.assistant span').textContent,
            status: document.querySelector('.assistant').dataset.status,
            latency: document.getElementById('timings').textContent,
            users: [...document.querySelectorAll('.user')].map(e => e.textContent),
            vad: document.getElementById('vad').dataset.state,
            connection: document.getElementById('connection').textContent,
            error: document.getElementById('error').textContent,
            main_view: document.body.innerText,  // what a person sees (the Details disclosure is closed)
        })"""
    )
    OUTPUT_DIR.mkdir(exist_ok=True)
    await page.screenshot(path=str(OUTPUT_DIR / screenshot), full_page=True)
    await page.click("#stop")
    await page.wait_for_selector("#start:not([disabled])", timeout=TIMEOUT_MS)
    shown["vad_after_stop"] = await page.eval_on_selector("#vad", "e => e.dataset.state")
    shown["page_errors"] = page_errors
    await page.close()
    return shown


async def check_accessibility(page, http_url: str) -> None:
    """Every control is at least 44 x 44 px (a checkbox counts with its label) and has a name; the favicon is
    linked and served; the page works from the keyboard alone with a visible focus."""
    controls = await page.evaluate(
        """() => [...document.querySelectorAll('button, input, select, summary')].map(el => {
            const r = (el.closest('label') || el).getBoundingClientRect();
            const name = (el.labels && el.labels[0] ? el.labels[0].textContent : '') ||
                el.getAttribute('aria-label') || el.textContent;
            return { id: el.id || el.tagName, w: r.width, h: r.height, name: name.trim() };
        })"""
    )
    assert len(controls) >= 7, controls
    for c in controls:
        assert c["w"] >= 44 and c["h"] >= 44 and c["name"], c
    meter_label = await page.evaluate("() => document.getElementById('level').labels[0].textContent")
    assert meter_label == "Microphone"
    icon = await page.get_attribute('link[rel="icon"]', "href")
    response = await page.request.get(f"{http_url}/{icon}")
    assert response.status == 200 and response.headers["content-type"].startswith("image/svg+xml")
    # Keyboard only: Tab reaches Start first (focus drawn), Enter starts, Tab + Enter on Stop stops.
    await page.keyboard.press("Tab")
    focused = await page.evaluate(
        "() => [document.activeElement.id, getComputedStyle(document.activeElement).outlineStyle]"
    )
    assert focused[0] == "start" and focused[1] != "none", focused
    await page.keyboard.press("Enter")
    await page.wait_for_selector("#stop:not([disabled])", timeout=TIMEOUT_MS)
    await page.focus("#start")  # disabled now: Tab from here goes to Stop
    await page.keyboard.press("Tab")
    assert await page.evaluate("() => document.activeElement.id") == "stop"
    await page.keyboard.press("Enter")
    await page.wait_for_selector('#vad[data-state="idle"]', timeout=TIMEOUT_MS)


async def test_page_streams_turns_downsamples_and_explains_insecure_origins(
    tiny_qwen_dir, server_tiny_backend, mic_wav
) -> None:
    """Protocol level with the tiny random model: capture -> VAD -> user turn -> answer element, stop, errors."""
    async with running_server(tiny_qwen_cfg(tiny_qwen_dir), backend=server_tiny_backend) as server:
        async with chromium(mic_wav) as browser:
            shown = await converse_in_browser(browser, server.http_url, "browser_tiny_model.png")
            assert shown["page_errors"] == [] and shown["error"] == ""
            assert shown["status"] in ("completed", "incomplete")
            assert shown["users"], "the spoken user turn is shown"
            assert "Hz mic → 16000 Hz" in shown["connection"]  # in the Details disclosure ...
            assert "Hz" not in shown["main_view"] and not re.search(r"\d\s*ms\b", shown["main_view"])  # ... only
            assert "Answer 1:" in shown["latency"]
            assert shown["vad_after_stop"] == "idle"

            # The worklet's downsampler: 48 kHz in -> one third as many samples out; a 1 kHz tone passes, a
            # 12 kHz tone (above the 8 kHz Nyquist of 16 kHz audio) is removed instead of aliasing to 4 kHz.
            page = await browser.new_page()
            await page.goto(server.http_url + "/")
            measured = await page.evaluate(
                """async () => {
                    const { Downsampler } = await import('./downsample.js');
                    const rms = (a) => Math.sqrt(a.reduce((s, x) => s + x * x, 0) / a.length);
                    const run = (hz) => {
                        const d = new Downsampler(48000, 16000), out = [], w = 2 * Math.PI * hz / 48000;
                        for (let b = 0; b < 100; b++) {  // 100 blocks of 128 samples, like an AudioWorklet
                            const x = new Float32Array(128);
                            for (let i = 0; i < 128; i++) x[i] = 0.5 * Math.sin(w * (b * 128 + i));
                            out.push(...d.process(x));
                        }
                        return { n: out.length, rms: rms(out.slice(200)) / 32767 };
                    };
                    return { pass: run(1000), stop: run(12000) };
                }"""
            )
            assert abs(measured["pass"]["n"] - 12800 / 3) <= 70  # minus the filter's start-up delay
            assert measured["pass"]["rms"] == pytest.approx(0.5 / 2**0.5, rel=0.05)
            assert measured["stop"]["rms"] < 0.01

            await check_accessibility(page, server.http_url)

            # Over plain http on a non-local name the browser hides the microphone: the page says why.
            await page.goto(f"http://{INSECURE_HOST}:{server.port}/")
            await page.click("#start")
            await page.wait_for_selector("#error:not(:empty)", timeout=TIMEOUT_MS)
            error = await page.text_content("#error")
            assert "microphone needs https or localhost" in error
            await page.close()


@pytest.mark.slow
async def test_spoken_question_answered_on_the_page_with_the_embedded_model(embedded_backend, mic_wav) -> None:
    """The real thing: the embedded model hears 'What is the capital of France?' and the page shows 'Paris'; the
    language menu says English, which the server echoes and hears the turn in (its English-only model)."""
    cfg = make_cfg(**{"generation.max_new_tokens": 48})
    async with running_server(cfg, backend=embedded_backend) as server, chromium(mic_wav) as browser:
        shown = await asyncio.wait_for(
            converse_in_browser(browser, server.http_url, "browser_embedded_paris.png", "en"), CLIENT_TIMEOUT_S
        )
    assert shown["page_errors"] == [] and shown["error"] == ""
    assert "france" in " ".join(shown["users"]).lower(), shown
    assert "paris" in shown["answer"].lower(), shown
    assert "first words after" in shown["latency"]


@pytest.mark.slow  # espeak-ng
async def test_wake_word_toggle_sets_the_session_and_the_page_shows_the_detection(
    tiny_qwen_dir, server_tiny_backend, wake_mic_wav
) -> None:
    """The toggle, ticked before Start, puts the wake word in the first session.update; the page shows the server's
    echo, the detection ("alexa") and then the turn and its answer (tiny random model: the text is noise)."""
    async with running_server(tiny_qwen_cfg(tiny_qwen_dir), backend=server_tiny_backend) as server:
        async with chromium(wake_mic_wav) as browser:
            page = await browser.new_page()
            page_errors: list[str] = []
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            await page.goto(server.http_url + "/")
            await page.check("#wake")
            await page.click("#start")
            await page.wait_for_selector('#wake[data-server="alexa"]', timeout=TIMEOUT_MS)
            await page.wait_for_selector('#vad:text("say “Alexa”")', timeout=TIMEOUT_MS)
            await page.wait_for_selector(".turn.wake", timeout=TIMEOUT_MS)
            await page.wait_for_selector(".assistant[data-status]", timeout=TIMEOUT_MS)
            assert "alexa" in (await page.text_content(".turn.wake")).lower()
            assert await page.is_checked("#wake")
            order = await page.evaluate("() => [...document.querySelectorAll('.turn')].map(e => e.className)")
            assert order[0] == "turn wake" and "turn user" in order and "turn assistant" in order, order
            OUTPUT_DIR.mkdir(exist_ok=True)
            await page.screenshot(path=str(OUTPUT_DIR / "browser_wake_word.png"), full_page=True)
            # Unticking it while connected turns it off on the server (its session.updated says so).
            await page.uncheck("#wake")
            await page.wait_for_selector('#wake[data-server=""]', timeout=TIMEOUT_MS)
            assert await page.text_content("#vad") == "listening"
            assert page_errors == [] and await page.text_content("#error") == ""
            await page.close()


# A microphone the test speaks into when it wants: getUserMedia returns a Web Audio stream; `__mic.say(b64, rate)`
# plays PCM16 into it. The constraints the page asked for are kept.
SCRIPTED_MIC = """
(() => {
  const mic = (window.__mic = { constraints: null, ctx: null, dest: null });
  navigator.mediaDevices.getUserMedia = async (constraints) => {
    mic.constraints = constraints;
    mic.ctx = new AudioContext();
    mic.dest = mic.ctx.createMediaStreamDestination();
    return mic.dest.stream;
  };
  mic.say = (b64, rateHz) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const pcm = new Int16Array(bytes.buffer);
    const buffer = mic.ctx.createBuffer(1, pcm.length, rateHz);
    const samples = buffer.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) samples[i] = pcm[i] / 32768;
    const source = mic.ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(mic.dest);
    source.start();
    return buffer.duration;
  };
})();
"""


def speech_b64(text: str) -> str:
    """`text` said by espeak-ng (16 kHz PCM16, base64) with silence around it, for `__mic.say`."""
    from bench.wake_word import clip, speak

    return base64.b64encode(clip(speak(text, speed=150)).astype("<i2").tobytes()).decode()


def wav_b64(path: Path) -> str:
    from tests.server_util import wav_pcm16

    return base64.b64encode(wav_pcm16(path).astype("<i2").tobytes()).decode()


@pytest.mark.slow
async def test_spoken_answer_plays_on_the_page_and_barge_in_truncates_it(
    embedded_backend, speech_pool, question_wav
) -> None:
    """The embedded model and the real voice: the page asks for echo cancellation and noise suppression, plays the
    spoken answer ("Paris") through Web Audio (speaking -> listening once it has played), and when the user talks
    over a long answer it stops at once and sends conversation.item.truncate with what was played, which the server
    acknowledges; the interrupted answer ends cancelled."""
    from tests.test_spoken_answers import spoken_cfg

    cfg = spoken_cfg(**{"generation.max_new_tokens": 120})
    async with running_server(cfg, backend=embedded_backend, speech=speech_pool) as server:
        async with chromium(Path("/dev/null")) as browser:
            page = await browser.new_page()
            page_errors: list[str] = []
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            await page.add_init_script(SCRIPTED_MIC)
            await page.goto(server.http_url + "/")
            await page.click("#start")
            await page.wait_for_selector('#vad[data-state="listening"]', timeout=TIMEOUT_MS)
            audio = await page.evaluate("() => window.__mic.constraints.audio")
            assert audio["echoCancellation"] is True and audio["noiseSuppression"] is True
            assert await page.is_checked("#speak") and not await page.is_disabled("#speak")

            # 1. A question; its spoken answer plays to the end, then the page listens again.
            await page.evaluate("([b, r]) => window.__mic.say(b, r)", [wav_b64(question_wav), 16000])
            await page.wait_for_selector(".assistant[data-status]", timeout=TIMEOUT_MS)
            await page.wait_for_function(
                """() => { const s = window.voiceAssistant.states;
                           return s.includes('speaking') && s[s.length - 1] === 'listening'; }""",
                timeout=TIMEOUT_MS,
            )
            first = await page.evaluate(
                """() => ({ answer: document.querySelector('.assistant span').textContent,
                            audio: window.voiceAssistant.audio, states: window.voiceAssistant.states,
                            level: window.voiceAssistant.maxLevel })"""
            )
            assert "paris" in first["answer"].lower(), first
            assert first["audio"]["receivedMs"] > 500 and first["audio"]["playedMs"] == pytest.approx(
                first["audio"]["receivedMs"], rel=0.01
            ), first  # every chunk played to its end
            states = first["states"]
            assert states.index("speaking") < len(states) - 1 and states[-1] == "listening", states
            assert first["level"] > 0.3  # the meter moved while the question was said
            OUTPUT_DIR.mkdir(exist_ok=True)
            await page.screenshot(path=str(OUTPUT_DIR / "browser_spoken_answer.png"), full_page=True)

            # 2. A long answer; the user talks over it once it has played a while.
            long_question = "Tell me a long story about a dragon and a knight."
            await page.evaluate("([b, r]) => window.__mic.say(b, r)", [speech_b64(long_question), 16000])
            await page.wait_for_function(
                """() => document.querySelectorAll('.assistant').length === 2 &&
                         document.getElementById('vad').dataset.state === 'speaking'""",
                timeout=TIMEOUT_MS,
            )
            await page.wait_for_timeout(1500)  # let some of it play (the story lasts far longer)
            # talk over audio that is playing, not into a gap between two clauses (then nothing is left unheard
            # to truncate): at least 1.5 s of it still to come when the user starts
            await page.wait_for_function("() => window.voiceAssistant.aheadMs() > 1500", timeout=TIMEOUT_MS)
            now = await page.evaluate(
                """() => ({ state: document.getElementById('vad').dataset.state, states: window.voiceAssistant.states,
                            turns: [...document.querySelectorAll('.turn')].map(e => e.className + ': ' + e.textContent),
                            truncates: window.voiceAssistant.truncates })"""
            )
            assert now["state"] == "speaking", now
            await page.evaluate("([b, r]) => window.__mic.say(b, r)", [speech_b64("Stop, please."), 16000])
            await page.wait_for_function("() => window.voiceAssistant.truncated.length >= 1", timeout=TIMEOUT_MS)
            cut = await page.evaluate(
                """() => ({ truncates: window.voiceAssistant.truncates, truncated: window.voiceAssistant.truncated,
                            audio: window.voiceAssistant.audio })"""
            )
            await page.wait_for_function(
                "() => document.querySelectorAll('.assistant')[1]?.dataset.status", timeout=TIMEOUT_MS
            )
            statuses = await page.evaluate(
                "() => [...document.querySelectorAll('.assistant')].map(e => e.dataset.status)"
            )
            await page.screenshot(path=str(OUTPUT_DIR / "browser_barge_in.png"), full_page=True)
            await page.close()
    assert page_errors == []
    assert len(cut["truncates"]) == 1 and cut["truncated"] == cut["truncates"]  # sent, and acknowledged
    heard_ms = cut["truncates"][0]["audioEndMs"]
    assert 1000 < heard_ms < cut["audio"]["receivedMs"] - first["audio"]["receivedMs"], cut
    assert statuses[1] == "cancelled", statuses  # the story was cut short by the user's speech
