"""slmctl export hf: a directory transformers loads (trust_remote_code) that computes what slmctl computes."""

import json
import shutil

import pytest
import torch
from conftest import TINY_PRETRAIN, cli, newest_run, randomize, train_run
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, pipeline

from slmctl.data.tokenizer import TextTokenizer
from slmctl.model import load_model, save_model
from slmctl.runtime.generator import load_generator
from slmctl.runtime.generator import prompt_ids as slmctl_prompt_ids

PROMPTS = ["Where does Tobrin live?", "Tobrin lives in Kadre. Where does Tobrin live?", "x",
           "Mira works at the Kadre Works and lives in Osslo. Where does Mira work?"]
FAST = ["validation.prompt_lens=[5,19]", "validation.steps=12", "validation.seed=0"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{arch: {"run": trained run, "trained": its export, "random": export of the same model with
    conftest.randomize weights (diverse tokens, a stricter check)}}, exported through the CLI."""
    runs = tmp_path_factory.mktemp("runs")
    made = {}
    for arch, extra in (("encdec", []), ("deconly", ["model.arch=deconly"])):
        run = train_run(runs, "pretrain", [*TINY_PRETRAIN, *extra], name=arch).path
        random_dir = tmp_path_factory.mktemp(f"random-{arch}")
        model = randomize(load_model(run / "model"), seed=3)
        save_model(model, random_dir, tokenizer=TextTokenizer.load(run / "model"))
        exported = {"run": run}
        for key, source in (("trained", run), ("random", random_dir)):
            result = cli("export", "hf", source, *FAST, "--name", f"{arch}-{key}", runs=runs)
            assert result.exit_code == 0, result.output
            exported[key] = newest_run(runs, "export", f"{arch}-{key}") / "export"
        made[arch] = exported
    made["runs"] = runs
    return made


def auto_model(directory):
    config = json.loads((directory / "config.json").read_text())
    auto = AutoModelForSeq2SeqLM if config["arch"] == "encdec" else AutoModelForCausalLM
    return auto.from_pretrained(directory, trust_remote_code=True).eval()


def padded_batch(directory):
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert not bool(batch["attention_mask"].all())  # a padded batch
    return batch


@pytest.mark.parametrize("arch", ["encdec", "deconly"])
@pytest.mark.parametrize("weights", ["trained", "random"])
def test_transformers_generates_the_greedy_tokens_of_slmctl_on_a_padded_batch(exports, arch, weights):
    directory = exports[arch][weights]
    hf_model, ours = auto_model(directory), load_model(directory)
    batch = padded_batch(directory)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    theirs = hf_model.generate(**batch, max_new_tokens=16, do_sample=False)
    theirs = theirs[:, 1:] if arch == "encdec" else theirs[:, ids.shape[1]:]  # drop the decoder start / the prompt
    expected = ours.generate(ids, mask, max_new_tokens=16)
    assert theirs.tolist() == expected.tolist()
    assert len({tuple(row) for row in expected.tolist()}) > 1 or weights == "trained"  # not one echoed token
    with torch.no_grad():
        if arch == "encdec":
            decoder_ids = torch.cat([torch.full((len(PROMPTS), 1), 1), expected[:, :-1]], dim=1)
            a = hf_model(**batch, decoder_input_ids=decoder_ids).logits
            b = ours(ids, mask, decoder_input_ids=decoder_ids).logits
        else:
            a, b = hf_model(**batch).logits[mask.bool()], ours(ids, mask).logits[mask.bool()]
    assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["encdec", "deconly"])
def test_beam_search_finds_slmctls_best_sequence(exports, arch):
    directory = exports[arch]["random"]
    hf_model, ours = auto_model(directory), load_model(directory)
    batch = padded_batch(directory)
    theirs = hf_model.generate(**batch, max_new_tokens=12, num_beams=4, do_sample=False)
    theirs = theirs[:, 1:] if arch == "encdec" else theirs[:, batch["input_ids"].shape[1]:]
    expected = ours.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=12, num_beams=4)
    assert theirs.tolist() == expected.tolist()
    greedy = ours.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=12)
    assert greedy.tolist() != expected.tolist()  # beam search mattered on these prompts


@pytest.mark.parametrize("arch", ["encdec", "deconly"])
def test_autotokenizer_encodes_and_decodes_as_slmctl(exports, arch):
    directory = exports[arch]["trained"]
    hf_tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    generator = load_generator(exports[arch]["run"])
    for text in [*PROMPTS, "  two spaces", "café 東京"]:
        ids = slmctl_prompt_ids(generator, text)
        assert hf_tokenizer(text)["input_ids"] == ids
        assert hf_tokenizer.decode(ids, skip_special_tokens=True) == generator.tokenizer.decode(ids)
    assert hf_tokenizer.padding_side == ("right" if arch == "encdec" else "left")


def test_text2text_pipeline_answers_as_slmctl_generate(exports):
    from slmctl.runtime.generator import generate_text

    directory = exports["encdec"]["random"]
    pipe = pipeline("text2text-generation", model=str(directory), trust_remote_code=True)
    got = pipe(PROMPTS[1], max_new_tokens=10)[0]["generated_text"]
    assert got == generate_text(load_generator(directory), PROMPTS[1], max_new_tokens=10)
    assert got  # some text


def test_save_pretrained_round_trip_and_slmctl_reads_it(exports, tmp_path):
    directory = exports["encdec"]["random"]
    hf_model = auto_model(directory)
    hf_model.save_pretrained(tmp_path / "again")
    shutil.copy(directory / "modeling_slmctl.py", tmp_path / "again")  # save_pretrained of a loaded remote model
    for name in ("tokenizer.json", "tokenizer_config.json", "slmctl_tokenizer.json"):
        shutil.copy(directory / name, tmp_path / "again")
    again = auto_model(tmp_path / "again")
    ours = load_model(tmp_path / "again")  # slmctl loads the transformers directory back
    original = load_model(exports["encdec"]["run"] / "model")
    ids = torch.randint(4, 400, (2, 7))
    decoder_ids = torch.randint(4, 400, (2, 3))
    with torch.no_grad():
        expected = hf_model(input_ids=ids, decoder_input_ids=decoder_ids).logits
        assert torch.equal(again(input_ids=ids, decoder_input_ids=decoder_ids).logits, expected)
        assert (ours(ids, decoder_input_ids=decoder_ids).logits - expected).abs().max() <= 1e-5
        assert not torch.allclose(original(ids, decoder_input_ids=decoder_ids).logits, expected)  # the randomized weights


def test_slmctl_commands_take_the_exported_directory(exports):
    run_model, directory = exports["deconly"]["run"] / "model", exports["deconly"]["trained"]
    result = cli("generate", directory, "prompt=Where does Tobrin live?", "--max-new-tokens", "6")
    expected = cli("generate", run_model, "prompt=Where does Tobrin live?", "--max-new-tokens", "6")
    assert result.exit_code == 0 and expected.exit_code == 0, result.output + expected.output
    assert result.stdout.strip().splitlines()[-1] == expected.stdout.strip().splitlines()[-1]


def test_generation_encodes_once_and_computes_cross_attention_keys_once_per_layer(exports):
    directory = exports["encdec"]["random"]
    hf_model = auto_model(directory)
    calls = {"encoder": 0, "kv": 0}
    hf_model.get_encoder().register_forward_pre_hook(lambda *_: calls.__setitem__("encoder", calls["encoder"] + 1))
    for layer in hf_model.decoder.layers:
        layer.cross_attn.kv.register_forward_pre_hook(lambda *_: calls.__setitem__("kv", calls["kv"] + 1))
    out = hf_model.generate(**padded_batch(directory), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape[1] == 9
    assert calls == {"encoder": 1, "kv": len(hf_model.decoder.layers)}


def test_gradient_checkpointing_recomputes_each_block_and_gives_the_same_gradients(exports):
    directory = exports["encdec"]["random"]
    batch = padded_batch(directory)
    labels = torch.randint(4, 400, (len(PROMPTS), 5))
    grads, calls = [], []
    for checkpointing in (False, True):
        model = auto_model(directory).train()
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable  # v5 / v4
            enable()
        block = model.decoder.layers[0]
        count = [0]
        block.register_forward_pre_hook(lambda *_, count=count: count.__setitem__(0, count[0] + 1))
        model(**batch, labels=labels).loss.backward()
        grads.append(model.decoder.layers[0].mlp.fc1.weight.grad.clone())
        calls.append(count[0])
    assert calls == [1, 2]  # recomputed in backward
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_the_model_card_says_what_the_lineage_holds(exports):
    runs = exports["runs"]
    run = exports["encdec"]["run"]
    result = cli("eval", run, "task=synthetic_qa", "limit=8", "task.n_people=200", "--name", "card", runs=runs)
    assert result.exit_code == 0, result.output
    result = cli("export", "hf", run, *FAST, "--name", "card", runs=runs)
    assert result.exit_code == 0, result.output
    card = (newest_run(runs, "export", "card") / "export" / "README.md").read_text()
    metrics = json.loads((newest_run(runs, "eval", "card") / "metrics.json").read_text())
    score = next(iter(metrics["tasks"]["synthetic_qa"]["models"].values()))["exact_match"]
    assert f"{score['value']:.3f} | [{score['low']:.3f}, {score['high']:.3f}]" in card
    parameters = load_model(run / "model").num_parameters()
    assert f"{parameters:,}" in card and "6 encoder, 3 decoder" in card
    assert run.name in card and "synthetic reading task" in card and "3 steps" in card
    assert "byte-level BPE" in card and "AutoModelForSeq2SeqLM" in card


def test_a_vision_model_exports_its_text_model_and_says_so(tmp_path):
    from slmctl.model import build_model
    from slmctl.model.vision import VisionConfig
    from slmctl.model.vlm import VisionEncoderDecoderLM, save_vision_model

    text = randomize(build_model("tiny", seed=0), seed=4)
    vlm = VisionEncoderDecoderLM(text, VisionConfig(image_size=32, patch_size=8, width=16, layers=2, heads=2), 3).eval()
    save_vision_model(vlm, tmp_path / "vlm")
    result = cli("export", "hf", tmp_path / "vlm", *FAST, runs=tmp_path / "runs")
    assert result.exit_code == 0, result.output
    export = newest_run(tmp_path / "runs", "export") / "export"
    assert "vision is not included" in (export / "README.md").read_text().lower()
    assert "vision is not included" in (export.parent / "log.txt").read_text()
    hf_model = auto_model(export)
    ids = torch.randint(4, 400, (1, 6))
    with torch.no_grad():
        expected = text(ids, decoder_input_ids=ids[:, :2]).logits
        assert (hf_model(input_ids=ids, decoder_input_ids=ids[:, :2]).logits - expected).abs().max() <= 1e-5


def test_an_export_that_computes_something_else_fails_validation(exports, tmp_path, monkeypatch):
    from slmctl.export import hf_export

    real = hf_export.to_transformers

    def off_by_a_little(model):
        hf_model = real(model)  # shares slmctl's tensors: give it a changed copy of one
        mlp = hf_model.decoder.layers[0].mlp
        mlp.fc2.bias = torch.nn.Parameter(mlp.fc2.bias.detach() + 1e-3)
        return hf_model

    monkeypatch.setattr(hf_export, "to_transformers", off_by_a_little)
    result = cli("export", "hf", exports["encdec"]["run"], *FAST, runs=tmp_path)
    assert result.exit_code == 1
    assert "transformers export failed validation: max |logit diff|" in result.output
    assert json.loads((newest_run(tmp_path, "export") / "status.json").read_text())["status"] == "failed"


def test_onnx_only_options_are_one_line_errors(exports, tmp_path):
    result = cli("export", "hf", exports["encdec"]["run"], "quantize=[int8]", runs=tmp_path)
    assert result.exit_code == 2
    assert "quantize and static shapes are for `slmctl export onnx`" in result.output
