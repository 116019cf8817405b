"""The bad-input matrix (docs/failure-modes.md): for every stage, each kind of bad input is a
one-line error on stderr, exit 2, no traceback, and no run left looking successful."""

import json
import shutil

import pytest
from conftest import TINY_SYNTHETIC_DATA, TINY_TRAINING, cli, newest_run, save_llama

from slmctl.model import build_model, save_model

VISION = ["vision.image_size=32", "vision.patch_size=16", "vision.width=32", "vision.layers=1", "vision.heads=2",
          "vision.max_tokens_per_image=8", "stage1.steps=1", "stage2.steps=1", "batch_size=2",
          "trainer.enable_progress_bar=false"]


def write(path, text):
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Runs and files every bad-input case is built from: a tiny encoder-decoder and decoder-only
    run, an ONNX export of each, a tiny Llama on disk, and damaged copies of them."""
    root = tmp_path_factory.mktemp("bad-input")
    runs = root / "runs"
    made = {}
    for name, model in (("encdec", "tiny"), ("deconly", "deconly-tiny")):
        result = cli("pretrain", f"model={model}", "objective=seq2seq", "tokenizer.vocab_size=300", *TINY_SYNTHETIC_DATA,
                     *TINY_TRAINING, "--name", name, runs=runs)
        assert result.exit_code == 0, result.output
        made[name] = newest_run(runs, "pretrain", name)
        result = cli("export", "onnx", made[name], "--name", f"{name}-onnx", runs=runs)
        assert result.exit_code == 0, result.output
        made[f"{name}_export"] = newest_run(runs, "export", f"{name}-onnx")
    from slmctl.data.tokenizer import TextTokenizer

    made["llama"] = save_llama(root / "llama", TextTokenizer.load(made["encdec"] / "model"))

    truncated = root / "truncated" / "model"
    shutil.copytree(made["encdec"] / "model", truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    made["truncated"] = truncated

    wrong_arch = root / "wrong-arch" / "model"  # decoder-only weights under an encoder-decoder model.json
    shutil.copytree(made["deconly"] / "model", wrong_arch)
    shutil.copy(made["encdec"] / "model" / "model.json", wrong_arch / "model.json")
    (wrong_arch / "checksums.json").unlink()  # assembled by hand, unsealed: what the files hold is checked
    made["wrong_arch"] = wrong_arch

    small_vocab = root / "small-vocab" / "model"  # a tokenizer with more tokens than the model's vocabulary
    save_model(build_model("tiny", vocab_size=128), small_vocab)
    for name in ("tokenizer.json", "slmctl_tokenizer.json"):
        shutil.copy(made["encdec"] / "model" / name, small_vocab / name)
    made["small_vocab"] = small_vocab

    swapped = root / "swapped-export"  # an export whose decoder graph came from another model
    shutil.copytree(made["encdec_export"] / "export", swapped)
    shutil.copy(made["deconly_export"] / "export" / "model.onnx", swapped / "decoder.onnx")
    made["swapped_export"] = swapped
    modified_run = root / "runs" / "export" / "20000101-000000-modified"  # the same, inside its run: the manifest catches it
    shutil.copytree(made["encdec_export"], modified_run)
    shutil.copy(made["deconly_export"] / "export" / "model.onnx", modified_run / "export" / "decoder.onnx")
    made["modified_export"] = modified_run

    made["modified_model"] = root / "runs" / "pretrain" / "20000101-000000-modified"  # weights changed after the run
    shutil.copytree(made["encdec"], made["modified_model"])
    weights = made["modified_model"] / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    made["modified_copy"] = root / "modified-copy"  # the same, copied out of its run: its checksums.json catches it
    shutil.copytree(made["modified_model"] / "model", made["modified_copy"])

    data_dir = root / "data"
    data_dir.mkdir()
    made["malformed"] = write(data_dir / "malformed.jsonl", '{"source": "a", "target": "b"}\n{"source": "a", tar\n')
    made["empty"] = write(data_dir / "empty.jsonl", "")
    made["texts_malformed"] = write(data_dir / "texts.jsonl", '{"text": "fine"}\n{"text": \n')
    write(data_dir / "not-an-image.png", "this is text, not a PNG")
    made["images"] = write(data_dir / "images.jsonl", json.dumps({"image": "not-an-image.png", "prompt": "<image> colour?",
                                                                  "answer": "red"}) + "\n")
    made["images_malformed"] = write(data_dir / "images-bad.jsonl", '{"image": "x.png", "prompt": "<image>"\n')
    made["images_empty"] = write(data_dir / "images-empty.jsonl", "")
    made["runs"] = runs
    made["missing"] = root / "no-such-path"
    return made


def teacher(w, path="llama"):
    return [f"teacher.path={w[path]}", "tokenizer=teacher"]


# what the one line must say (all of the fragments) for rows several stages share
TRUNCATED = ("model.safetensors: size 1000, manifest says",)
WRONG_ARCH = ("model.safetensors does not fit a tiny model: missing",)
MODIFIED = ("sha256 differs from the manifest (modified), since its run finished", "MANIFEST.json")
NO_CUDA = ("--device cuda: no CUDA device",)
SWAPPED = ("decoder.onnx is not the graph slmctl_onnx.json describes",)
NOT_A_TEACHER = ("is an encoder-decoder; a teacher must be a decoder-only LM",)
EMPTY = ("empty.jsonl is empty",)

# stage -> [(row, argv builder, expected message fragment(s))]; every row exits 2.
MATRIX = {
    "pretrain": [
        ("unknown override", lambda w: ["model=tiny", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
        ("wrong type", lambda w: ["model=tiny", "batch_size=many"], ("batch_size", "'many'", "Integer")),
        ("missing file", lambda w: ["model=tiny", "data=files", f"data.train={w['missing']}.jsonl"],
         ("no such data file", "no-such-path.jsonl")),
        ("malformed jsonl", lambda w: ["model=tiny", "data=files", f"data.train={w['texts_malformed']}"], "texts.jsonl:2"),
        ("empty dataset", lambda w: ["model=tiny", "data=files", f"data.train={w['empty']}"], EMPTY),
        ("vocab mismatch", lambda w: [f"init={w['small_vocab']}", *TINY_SYNTHETIC_DATA, "objective=seq2seq"],
         "the tokenizer is not this model's"),
        ("corrupt checkpoint", lambda w: [f"init={w['truncated']}", *TINY_SYNTHETIC_DATA, "objective=seq2seq"], TRUNCATED),
        ("modified checkpoint", lambda w: [f"init={w['modified_model']}", *TINY_SYNTHETIC_DATA, "objective=seq2seq"], MODIFIED),
        ("modified copy of a model", lambda w: [f"init={w['modified_copy']}", *TINY_SYNTHETIC_DATA, "objective=seq2seq"],
         "checksums.json"),
        ("wrong architecture", lambda w: [f"init={w['wrong_arch']}", *TINY_SYNTHETIC_DATA, "objective=seq2seq"], WRONG_ARCH),
        ("device not present", lambda w: ["model=tiny", "--device", "cuda"], NO_CUDA),
        ("trainer the machine cannot run", lambda w: ["model=tiny", *TINY_SYNTHETIC_DATA, "trainer=fsdp", "trainer.accelerator=cpu"],
         "the trainer settings do not work here: The strategy `fsdp` requires a GPU accelerator"),
    ],
    "distill": [
        ("unknown override", lambda w: [*teacher(w), "kd.alhpa=1"], "unknown config key 'kd.alhpa'"),
        ("wrong type", lambda w: [*teacher(w), "kd.alpha=half"], ("kd.alpha", "'half'", "Float")),
        ("missing file", lambda w: [f"teacher.path={w['missing']}"], ("teacher.path", "no-such-path", "no such directory")),
        ("malformed jsonl", lambda w: [*teacher(w), "data=files", f"data.train={w['malformed']}"], "malformed.jsonl:2"),
        ("empty dataset", lambda w: [*teacher(w), "data=files", f"data.train={w['empty']}"], EMPTY),
        ("vocab mismatch", lambda w: [*teacher(w), f"student.init={w['small_vocab']}", *TINY_SYNTHETIC_DATA],
         "the tokenizer is not this model's"),
        ("corrupt checkpoint", lambda w: [*teacher(w), f"student.init={w['truncated']}", *TINY_SYNTHETIC_DATA], TRUNCATED),
        ("teacher not a causal LM", lambda w: [f"teacher.path={w['encdec']}/model", *TINY_SYNTHETIC_DATA], NOT_A_TEACHER),
        ("device not present", lambda w: [*teacher(w), "--device", "cuda"], NO_CUDA),
    ],
    "add-vision": [
        ("unknown override", lambda w: [w["encdec"], "vision.widht=8"], "unknown config key 'vision.widht'"),
        ("wrong type", lambda w: [w["encdec"], "stage1.steps=few"], ("stage1.steps", "'few'", "Integer")),
        ("missing file", lambda w: [w["missing"]], ("no-such-path", "no such directory")),
        ("malformed jsonl", lambda w: [w["encdec"], "data=images", f"data.train={w['images_malformed']}", *VISION],
         "images-bad.jsonl:1"),
        ("empty dataset", lambda w: [w["encdec"], "data=images", f"data.train={w['images_empty']}", *VISION], "images-empty.jsonl"),
        ("image that is not an image", lambda w: [w["encdec"], "data=images", f"data.train={w['images']}", *VISION],
         ("images.jsonl:1", "not-an-image.png cannot be read")),
        ("corrupt checkpoint", lambda w: [w["truncated"], *VISION], TRUNCATED),
        ("wrong architecture", lambda w: [w["deconly"], *VISION], ("is a decoder-only model; add-vision feeds images to an encoder",)),
        ("device not present", lambda w: [w["encdec"], "--device", "cuda"], NO_CUDA),
    ],
    "eval": [
        ("unknown override", lambda w: [w["encdec"], "task=synthetic_qa", "limitt=3"], "unknown config key 'limitt'"),
        ("wrong type", lambda w: [w["encdec"], "task=synthetic_qa", "limit=some"], ("limit", "'some'", "Integer")),
        ("missing file", lambda w: [w["missing"], "task=synthetic_qa"], ("no-such-path", "no such directory")),
        ("malformed jsonl", lambda w: [w["encdec"], "task=jsonl", f"task.data_files={w['malformed']}"], "malformed.jsonl:2"),
        ("empty dataset", lambda w: [w["encdec"], "task=jsonl", f"task.data_files={w['empty']}"], EMPTY),
        ("vocab mismatch", lambda w: [w["small_vocab"], "task=synthetic_qa"], "the tokenizer is not this model's"),
        ("corrupt checkpoint", lambda w: [w["truncated"], "task=synthetic_qa"], TRUNCATED),
        ("modified checkpoint", lambda w: [w["modified_model"], "task=synthetic_qa"], MODIFIED),
        ("modified copy of a model", lambda w: [w["modified_copy"], "task=synthetic_qa"], "checksums.json"),
        ("wrong architecture", lambda w: [w["wrong_arch"], "task=synthetic_qa"], WRONG_ARCH),
        ("ONNX graph from another model", lambda w: [w["swapped_export"], "task=synthetic_qa", "--runtime", "onnx"],
         SWAPPED),
        ("device not present", lambda w: [w["encdec"], "task=synthetic_qa", "--device", "cuda"], NO_CUDA),
    ],
    "export": [
        ("unknown override", lambda w: ["onnx", w["encdec"], "opsett=17"], "unknown config key 'opsett'"),
        ("wrong type", lambda w: ["onnx", w["encdec"], "static.batch=two"], ("static.batch", "'two'", "Integer")),
        ("missing file", lambda w: ["onnx", w["missing"]], ("no-such-path", "no such directory")),
        ("vocab mismatch", lambda w: ["onnx", w["small_vocab"]], "the tokenizer is not this model's"),
        ("corrupt checkpoint", lambda w: ["onnx", w["truncated"]], TRUNCATED),
        ("modified checkpoint", lambda w: ["onnx", w["modified_model"]], MODIFIED),
        ("modified copy of a model", lambda w: ["onnx", w["modified_copy"]], "checksums.json"),
        ("wrong architecture", lambda w: ["onnx", w["wrong_arch"]], WRONG_ARCH),
        ("device not present", lambda w: ["onnx", w["encdec"], "--device", "cuda"], NO_CUDA),
    ],
    "bench": [
        ("unknown override", lambda w: [w["encdec"], "repeatt=1"], "unknown config key 'repeatt'"),
        ("wrong type", lambda w: [w["encdec"], "--repeat", "x"], ("--repeat", "integer")),
        ("missing file", lambda w: [w["missing"]], ("no-such-path", "no such directory")),
        ("corrupt checkpoint", lambda w: [w["truncated"]], TRUNCATED),
        ("modified checkpoint", lambda w: [w["modified_model"]], MODIFIED),
        ("modified copy of a model", lambda w: [w["modified_copy"]], "checksums.json"),
        ("wrong architecture", lambda w: [w["wrong_arch"]], WRONG_ARCH),
        ("ONNX graph from another model", lambda w: [w["swapped_export"], "--runtime", "onnx"], SWAPPED),
        ("modified ONNX export", lambda w: [w["modified_export"], "--runtime", "onnx"],
         ("decoder.onnx: size", "since its run finished", "MANIFEST.json")),
        ("device not present", lambda w: [w["encdec"], "--device", "npu"], ("--device npu: no NPU execution provider",)),
    ],
}
CASES = [(stage, row, build, message) for stage, rows in MATRIX.items() for row, build, message in rows]


@pytest.mark.parametrize("stage, row, build, message", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_bad_input_is_a_one_line_error_with_exit_2_and_no_successful_run(world, tmp_path, stage, row, build, message):
    runs = tmp_path / "runs"
    for finished in world["runs"].glob("*/*"):  # runs referenced by name resolve under --runs-dir
        (runs / finished.parent.name).mkdir(parents=True, exist_ok=True)
    result = cli(*stage.split(), *build(world), runs=runs)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr
    for fragment in (message,) if isinstance(message, str) else message:
        assert fragment in errors[0], (fragment, errors[0])
    assert "Traceback" not in result.output
    statuses = [json.loads(p.read_text())["status"] for p in runs.glob("*/*/status.json")]
    assert all(status == "failed" for status in statuses), statuses  # a run opened before the problem showed
    assert not list(runs.glob("*/latest"))


@pytest.mark.parametrize("args, message", [
    (["pretrain", "model=tiny", "trainer.max_steps=abc"], "trainer.max_steps='abc': input should be a valid integer"),
    (["pretrain", "model=tiny", "trainer.precision=bogus"], "trainer.precision='bogus': none of the values"),
    (["export", "onnx"], "no model given and no succeeded distill or pretrain run"),
])
def test_bad_input_is_refused_before_a_run_directory_exists(tmp_path, args, message):
    result = cli(*args, runs=tmp_path / "runs")
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "runs").exists()
