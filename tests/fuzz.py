"""Coverage-guided fuzzing (atheris + libFuzzer) of the frame decoder, the GGUF reader and the cloud's
request handler. Each target accepts only its documented errors; anything else, or a crash, is a
finding (libFuzzer saves the input as crash-<sha1>: add it to tests/fuzz_corpus/<target>/ and a test).

    python tests/fuzz.py wire|gguf|handler [libFuzzer options] [corpus dirs]
    python tests/fuzz.py handler -max_total_time=600 /tmp/corpus tests/fuzz_corpus/handler   # a long run
    python tests/fuzz.py --write-corpus      # regenerates the seed inputs in tests/fuzz_corpus/

Coverage guides on the Python side (the handler, the loader's checks); the C decoder and C model
checks below them run uninstrumented (gcc builds no libFuzzer coverage), and ASan/UBSan watch the C
core in the C tests' own random-mutation fuzzing.
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["cecollm"]):
    from cecollm import _core
    from cecollm.cloud import Cloud, Handler
    from cecollm.gguf_loader import ModelFormatError, load_gguf
    from cecollm.model import Model
    from cecollm.protocol import Msg

CORPUS = os.path.join(os.path.dirname(__file__), "fuzz_corpus")
SID = b"\xaa" * 16  # stands for the pre-opened session's id in handler inputs
_state: dict = {}


def tiny_model() -> Model:
    from tiny_gguf import write_tiny_gguf

    if "model" not in _state:
        path = os.path.join(tempfile.mkdtemp(), "tiny.gguf")
        write_tiny_gguf(path)
        _state["model"] = Model(load_gguf(path))
    return _state["model"]


def fuzz_wire(data: bytes) -> None:
    try:
        msg = _core.wire_decode(data, 1 << 20)
    except ValueError:
        return
    frame = _core.wire_encode(msg)  # whatever decodes re-encodes, to the same message
    assert _core.wire_decode(frame[4:], 1 << 20) == msg


def fuzz_gguf(data: bytes) -> None:
    path = _state.setdefault("gguf_path", os.path.join(tempfile.mkdtemp(), "input.gguf"))
    with open(path, "wb") as f:
        f.write(data)
    try:
        weights = load_gguf(path)
    except ModelFormatError:
        return
    try:
        Model(weights)
    except ValueError:  # e.g. a tokenizer the model cannot use
        return


def fuzz_handler(data: bytes) -> None:
    if "handler" not in _state:
        cloud = Cloud(tiny_model(), split=1, kv_budget_bytes=64 << 20, batching=False)
        _state["handler"], _state["cloud"] = Handler(cloud), cloud
    handler, cloud = _state["handler"], _state["cloud"]
    if len(cloud.sessions) > 32:  # keep memory bounded across millions of inputs
        for sid in list(cloud.sessions):
            cloud.close(sid)
    sid = _state.get("sid")
    if sid not in cloud.sessions:
        sid = _state["sid"] = cloud.open(64)
    reply = handler.handle(data.replace(SID, sid), "fuzzer")
    assert _core.wire_decode(reply[4:], 1 << 20)["type"] in (Msg.REPLY, Msg.TOKEN, Msg.TOKENS, Msg.ERROR)


TARGETS = {"wire": fuzz_wire, "gguf": fuzz_gguf, "handler": fuzz_handler}


def write_corpus() -> None:
    """Seed inputs: valid frames of every request type, and the tiny model's GGUF."""
    import numpy as np
    from tiny_gguf import write_tiny_gguf

    dim = 64
    data = _core.hidden_encode(np.linspace(-1, 1, 2 * dim, dtype=np.float32).reshape(2, dim), _core.WIRE_F16)
    hidden = {"sid": SID, "dim": dim, "dtype": _core.WIRE_F16, "data": data, "n": 2}
    frames = {
        "open": {"type": Msg.OPEN, "seq": 1, "cap": 64},
        "upload": {"type": Msg.UPLOAD, "seq": 2, "pos": 0, **hidden},
        "infer": {"type": Msg.INFER, "seq": 3, "pos": 0, **hidden},
        "verify": {"type": Msg.VERIFY, "seq": 4, "pos": 0, **hidden},
        "resume": {"type": Msg.RESUME, "seq": 5, "sid": SID},
        "close": {"type": Msg.CLOSE, "seq": 6, "sid": SID},
        "hello": {"type": Msg.HELLO, "ver": _core.WIRE_VERSION, "model": "0" * 32, "split": 1, "dtype": 1},
        "error": {"type": Msg.ERROR, "code": 4, "msg": "busy", "seq": 9},
    }
    for target in ("wire", "handler"):
        os.makedirs(os.path.join(CORPUS, target), exist_ok=True)
        for name, msg in frames.items():
            with open(os.path.join(CORPUS, target, name), "wb") as f:
                f.write(_core.wire_encode(msg)[4:])
    os.makedirs(os.path.join(CORPUS, "gguf"), exist_ok=True)
    write_tiny_gguf(os.path.join(CORPUS, "gguf", "tiny.gguf"), n_layers=1, dim=32, ffn=32, n_heads=2, n_kv_heads=1)


def main() -> None:
    if sys.argv[1:] == ["--write-corpus"]:
        write_corpus()
        return
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {'|'.join(TARGETS)} [libFuzzer options] [corpus dirs]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0]] + sys.argv[2:], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
