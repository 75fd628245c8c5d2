"""Stages: pretrain -> SFT mains end to end, reward-model accuracy and score normalisation, resume, init_from
(another stage's workdir, a Hugging Face dir), and a clear error that names the field or file:line for bad input."""
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
import sentencepiece as spm

import fixtures
from rlhf_jax import checkpoint, hf_import, metrics, ppo, stages
from rlhf_jax.model import ScalarHead, Transformer, TransformerConfig, init_params, stack_layers
from rlhf_jax.tokenizer import load_tokenizer

HF_GPT2 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", "hf", "gpt2")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
  return fixtures.pipeline(tmp_path_factory)


def _same_tree(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [jax.tree_util.keystr(p) for p, _ in la] == [jax.tree_util.keystr(p) for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def _file_bytes(path):
  with open(path, "rb") as f:
    return f.read()


# ------------------------------------------------------------------------------------------ mains end to end


def test_pretrain_then_sft_mains_end_to_end(pipe, tmp_path):
  pre, sft, cache = str(tmp_path / "pretrain"), str(tmp_path / "sft"), pipe["jax_cache"]
  out = fixtures.run_main("pretrain", pre, fixtures.tiny_flags(**{
      "data.train": pipe["corpus"], "train.num_steps": 5, "opt.lr": 3e-3}), cache)
  assert out.returncode == 0, out.stderr[-3000:]
  train = [r["train_loss"] for r in metrics.read_jsonl(os.path.join(pre, "metrics.jsonl"))]
  assert len(train) == 5 and train[-1] < train[0] < 1.1 * np.log(fixtures.VOCAB)
  assert checkpoint.Checkpointer(pre, create=False).latest_step() == 5

  out = fixtures.run_main("sft", sft, fixtures.tiny_flags(**{
      "data.train": pipe["demonstrations"], "train.init_from": pre, "train.num_steps": 3,
      "model.d_model": 48}), cache)  # init_from wins over cfg.model: the architecture is the pretrained one
  assert out.returncode == 0, out.stderr[-3000:]
  assert "initialised params from" in out.stderr
  extra = checkpoint.load_extra(sft)
  assert extra["meta"]["stage"] == "sft" and extra["meta"]["model"] == checkpoint.load_extra(pre)["meta"]["model"]
  assert _file_bytes(os.path.join(sft, "tokenizer.model")) == _file_bytes(os.path.join(pre, "tokenizer.model"))
  assert [r["step"] for r in metrics.read_jsonl(os.path.join(sft, "metrics.jsonl"))] == [1, 2, 3]


@pytest.fixture(scope="module")
def flag_errors(tmp_path_factory):
  """stderr and exit code of the pretraining main given an unknown --config key, and a value of the wrong type."""
  corpus = fixtures.task_files(str(tmp_path_factory.mktemp("task")))["corpus"]
  runs = {"unknown key": {"data.trian_files": "x"}, "wrong type": {"train.num_steps": "abc"}}
  wd = str(tmp_path_factory.mktemp("flag_errors") / "wd")
  out = {k: fixtures.run_main("pretrain", wd, {"data.train": corpus, **v}) for k, v in runs.items()}
  assert not os.path.exists(wd)  # nothing written: flags are parsed before the stage starts
  return out


def test_unknown_config_key_exits_nonzero_naming_the_key(flag_errors):
  out = flag_errors["unknown key"]
  assert out.returncode != 0
  assert "'trian_files'" in out.stderr.strip().splitlines()[-1], out.stderr[-2000:]


def test_unknown_config_key_is_one_clean_error_line(flag_errors):
  out = flag_errors["unknown key"]
  assert "Traceback" not in out.stderr and "--config.data.trian_files" in out.stderr, out.stderr[-2000:]


def test_config_value_of_the_wrong_type_is_one_clean_error_line(flag_errors):
  out = flag_errors["wrong type"]
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert ("FATAL Flags parsing error: flag --config.train.num_steps=abc: invalid literal for int() with base 10: "
          "'abc'") in out.stderr


def test_main_reports_a_bad_input_as_one_error_line(tmp_path):
  wd, missing = str(tmp_path / "wd"), str(tmp_path / "missing.txt")
  out = fixtures.run_main("pretrain", wd, {"data.train": missing})
  assert out.returncode == 1
  assert f"error: config data.train: data file '{missing}' does not exist" in out.stderr
  assert "Traceback" not in out.stderr and not checkpoint.has_checkpoint(wd)


# ------------------------------------------------------------------------------------------ reward model


def test_reward_model_heldout_pairwise_accuracy(pipe):
  """The pipeline's RM: SFT backbone + new head, 30 steps on answer-vs-filler comparisons, 64 held-out pairs."""
  rows = metrics.read_jsonl(os.path.join(pipe["rm"], "metrics.jsonl"))
  train = [r["train_loss"] for r in rows if "train_loss" in r]
  evals = [r for r in rows if "eval_accuracy" in r]
  # measured: eval_accuracy 1.0 after 30 steps (0.97 after 10); train loss 0.65 -> ~0.001
  assert len(evals) == 1 and evals[0]["step"] == fixtures.RM_STEPS
  assert evals[0]["eval_accuracy"] >= 0.9, evals
  assert np.mean(train[-5:]) < 0.25 * train[0], train


def _hand_scores(rm_params, model, tok, records, L=64):
  """RM score of each [bos] + prompt + response + [eos], right-padded to L: ScalarHead on its last token's state."""
  ids = [[tok.bos_id] + tok.encode(r["prompt"]) + tok.encode(r["response"]) + [tok.eos_id] for r in records]
  tokens = np.full((len(ids), L), tok.pad_id, np.int32)
  for i, x in enumerate(ids):
    tokens[i, :len(x)] = x
  last = np.asarray([len(x) - 1 for x in ids])

  @jax.jit
  def score(params, tokens):  # causal: right padding never reaches the last real token
    _, h = Transformer(model).apply({"params": params["backbone"]}, tokens)
    return ScalarHead(model).apply({"params": params["head"]}, h)[np.arange(len(ids)), last]

  return np.asarray(score(rm_params, tokens))


def test_reward_offset_centres_the_demonstration_scores(pipe):
  with open(os.path.join(pipe["rm"], stages.NORM_FILE)) as f:
    norm = json.load(f)
  with open(pipe["demonstrations"]) as f:
    demos = [json.loads(line) for line in f]
  assert norm["num_demonstrations"] == len(demos) == fixtures.TASK.num_demonstrations
  model, params, offset = stages.load_reward_model(pipe["rm"])
  assert offset == norm["offset"]
  scores = _hand_scores(params, model, load_tokenizer(os.path.join(pipe["rm"], "tokenizer.model")), demos)
  assert abs(scores.mean() - offset) < 1e-4 * max(1.0, abs(offset))
  assert abs(offset) > 1e-3 and scores.std() > 1e-3  # not trivially 0


# ------------------------------------------------------------------------------------------ resume, init_from


def _snapshot(workdir):
  """Checkpoint dirs with their mtimes, and the bytes of every file the stage writes at the top of its workdir."""
  ckpt = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
  files = [f for f in ("metrics.jsonl", "tokenizer.model", stages.NORM_FILE)
           if os.path.exists(os.path.join(workdir, f))]
  return ({d: os.stat(os.path.join(ckpt, d)).st_mtime_ns for d in sorted(os.listdir(ckpt))},
          {f: _file_bytes(os.path.join(workdir, f)) for f in files})


def test_second_run_of_a_finished_stage_does_nothing(pipe):
  runs = {"pretrain": lambda: stages.run_lm(fixtures.pretrain_cfg(pipe), pipe["pretrain"], "pretrain"),
          "sft": lambda: stages.run_lm(fixtures.sft_cfg(pipe, pipe["pretrain"]), pipe["sft"], "sft"),
          "rm": lambda: stages.run_reward(fixtures.reward_cfg(pipe, pipe["sft"]), pipe["rm"])}
  for name, run in runs.items():
    before = _snapshot(pipe[name])
    assert run() == {}, name  # no step ran, so no metrics
    assert _snapshot(pipe[name]) == before, name


def test_init_from_another_stage_starts_from_its_params_and_tokenizer(pipe):
  # the pipeline's SFT ran with opt.lr=0 from the pretraining workdir: its params are exactly the pretrained ones
  _same_tree(checkpoint.load_params(pipe["sft"])[0], checkpoint.load_params(pipe["pretrain"])[0])
  assert checkpoint.load_extra(pipe["sft"])["meta"]["model"] == checkpoint.load_extra(pipe["pretrain"])["meta"]["model"]
  assert (_file_bytes(os.path.join(pipe["sft"], "tokenizer.model"))
          == _file_bytes(os.path.join(pipe["pretrain"], "tokenizer.model")))
  # the RM starts from the SFT backbone with a new head, keeps the architecture and tokenizer
  rm_params = checkpoint.load_params(pipe["rm"])[0]
  assert sorted(rm_params) == ["backbone", "head"]
  checkpoint.check_same_structure(checkpoint.load_params(pipe["sft"])[0], rm_params["backbone"], "rm")


@pytest.fixture(scope="module")
def tok96(pipe, tmp_path_factory):
  """A sentencepiece model with the tiny HF checkpoints' vocabulary size (96; no byte fallback)."""
  prefix = str(tmp_path_factory.mktemp("tok96") / "tok96")
  spm.SentencePieceTrainer.Train(input=pipe["corpus"], model_prefix=prefix, vocab_size=96, model_type="bpe",
                                 pad_id=0, unk_id=1, bos_id=2, eos_id=3, character_coverage=1.0, num_threads=1,
                                 minloglevel=2)
  return prefix + ".model"


def test_init_from_hf_dir_without_tokenizer_is_a_clear_error(pipe, tmp_path):
  cfg = fixtures.sft_cfg(pipe, f"hf:{HF_GPT2}")
  wd = str(tmp_path / "sft")
  with pytest.raises(ValueError, match=re.escape(f"config train.init_from='hf:{HF_GPT2}' has no tokenizer: "
                                                 "pass --config.tokenizer.path (tokenizer folder")):
    stages.run_lm(cfg, wd, "sft")
  assert not checkpoint.has_checkpoint(wd)


def test_init_from_hf_dir_with_tokenizer_path(pipe, tok96, tmp_path):
  cfg = fixtures.sft_cfg(pipe, f"hf:{HF_GPT2}")
  cfg.tokenizer.path = tok96
  init = stages.resolve_init(cfg, str(tmp_path / "sft"), [pipe["demonstrations"]])
  hf_cfg, hf_params = hf_import.load_hf_checkpoint(HF_GPT2)
  assert init.model == hf_cfg and hf_cfg.vocab_size == init.tokenizer.vocab_size == 96
  assert init.tokenizer.path == tok96
  fresh = jax.eval_shape(lambda: init_params(init.model, jax.random.PRNGKey(0)))
  _same_tree(stages.checked_params_fn(init, cfg.train.init_from)(fresh), hf_params)


QWEN3_SMALL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", "tokenizers", "qwen3_small")


def _hf_dir_with_tokenizer(d, vocab_size):
  """A tiny llama HF checkpoint (embedding rows = vocab_size) holding the reduced Qwen3 tokenizer files."""
  cfg = TransformerConfig(vocab_size=vocab_size, d_model=32, num_heads=2, num_kv_heads=1, d_ff=64, num_layers=1,
                          max_len=64, family="llama", tie_embeddings=True)
  hf_import.save_hf_checkpoint(cfg, init_params(cfg, jax.random.PRNGKey(0)), str(d))
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copyfile(os.path.join(QWEN3_SMALL, name), os.path.join(d, name))
  return str(d)


def test_init_from_hf_dir_brings_its_tokenizer_and_chat_template(pipe, tmp_path):
  hf = _hf_dir_with_tokenizer(tmp_path / "hf", 3328)  # 3282 tokens, embeddings padded to a multiple of 64
  cfg = fixtures.sft_cfg(pipe, f"hf:{hf}", steps=2)
  cfg.data.seq_len, cfg.data.truncate, cfg.data.chat_template = 64, True, True
  wd = str(tmp_path / "sft")
  stages.run_lm(cfg, wd, "sft")
  assert sorted(os.listdir(os.path.join(wd, "tokenizer"))) == ["tokenizer.json", "tokenizer_config.json"]
  model, _, tok = stages.load_policy(wd)
  assert model.vocab_size == 3328 and tok.vocab_size == 3282 and tok.apply_chat  # the next stage keeps the template
  assert tok.prompt_parts("hi")[1][:1] == [tok.encode("<|im_start|>")[0]]
  small = _hf_dir_with_tokenizer(tmp_path / "small", 3200)
  with pytest.raises(ValueError, match=re.escape(f"hf:{small} vocab_size=3200 but tokenizer") + ".*vocab_size=3282"):
    stages.resolve_init(fixtures.sft_cfg(pipe, f"hf:{small}"), str(tmp_path / "x"), [pipe["demonstrations"]])


def test_init_from_an_unrolled_checkpoint_into_a_scan_layers_run(pipe):
  """cfg.model's runtime fields (scan_layers, remat, attention) apply to an init_from model; the unrolled
  checkpoint's params arrive stacked, equal to model.stack_layers of them."""
  cfg = fixtures.sft_cfg(pipe, pipe["pretrain"])
  cfg.model.scan_layers, cfg.model.remat = True, "block"
  init = stages.resolve_init(cfg, "/nonexistent-workdir", [pipe["demonstrations"]])
  source = TransformerConfig.from_dict(checkpoint.load_extra(pipe["pretrain"])["meta"]["model"])
  assert init.model.scan_layers and init.model.remat == "block" and not source.scan_layers
  fresh = jax.eval_shape(lambda: init_params(init.model, jax.random.PRNGKey(0)))
  _same_tree(stages.checked_params_fn(init, cfg.train.init_from)(fresh),
             stack_layers(checkpoint.load_params(pipe["pretrain"])[0]))


# ------------------------------------------------------------------------------------------ bad input


def _write(path, lines):
  with open(path, "w") as f:
    f.writelines(line + "\n" for line in lines)
  return str(path)


def _bad_case(name, pipe, tok96, d):
  """(function that runs a stage into d/wd, the exact start of the message it must raise) for input `name`."""
  wd, pre_tok = str(d / "wd"), os.path.join(pipe["pretrain"], "tokenizer.model")
  pre = lambda **kw: _with(fixtures.pretrain_cfg(pipe), **kw)
  if name == "missing data file":
    path = str(d / "missing.txt")
    return lambda: stages.run_lm(pre(**{"data.train": path}), wd, "pretrain"), \
        f"config data.train: data file '{path}' does not exist"
  if name == "empty data file":
    path = _write(d / "empty.txt", [])
    return lambda: stages.run_lm(pre(**{"data.train": path}), wd, "pretrain"), \
        f"config data.train: data file '{path}' is empty"
  if name == "malformed JSONL line":
    path = _write(d / "demos.jsonl", ['{"prompt": "sort: 3 1 2 =", "response": "1 2 3"}', "",
                                      '{"prompt": "sort: 3 1 2 =", "response": "1 2 3"'])
    cfg = _with(fixtures.sft_cfg(pipe, pipe["pretrain"]), **{"data.train": path})
    return lambda: stages.run_lm(cfg, wd, "sft"), f"{path}:3: bad JSON (Expecting ',' delimiter at column 48)"
  if name == "comparison with K < 2":
    path = _write(d / "cmp.jsonl", [json.dumps({"prompt": "add: 1+2 =", "chosen": "3", "rejected": "4"}),
                                    json.dumps({"prompt": "add: 1+2 =", "responses": ["3"], "ranking": [0]})])
    cfg = _with(fixtures.reward_cfg(pipe, pipe["sft"]), **{"data.train": path})
    return lambda: stages.run_reward(cfg, wd), f"{path}:2: a comparison needs K >= 2 responses, got 1"
  if name == "reward loss.lm_coef < 0":
    cfg = _with(fixtures.reward_cfg(pipe, pipe["sft"]), **{"loss.lm_coef": -1.0})
    return lambda: stages.run_reward(cfg, wd), "config loss.lm_coef=-1.0 must be >= 0"
  if name == "tokenizer vocab != model.vocab_size":
    cfg = pre(**{"tokenizer.path": pre_tok, "model.vocab_size": 400})
    return lambda: stages.run_lm(cfg, wd, "pretrain"), \
        f"config model.vocab_size=400 but tokenizer '{pre_tok}' has vocab_size=320; they must match"
  if name == "tokenizer vocab != init_from vocab":
    cfg = _with(fixtures.sft_cfg(pipe, pipe["pretrain"]), **{"tokenizer.path": tok96})
    return lambda: stages.run_lm(cfg, wd, "sft"), (f"train.init_from={pipe['pretrain']!r} model.vocab_size=320 but "
                                                   f"tokenizer '{tok96}' has vocab_size=96; they must match")
  if name == "init_from a different architecture (RM workdir into SFT)":
    cfg = fixtures.sft_cfg(pipe, pipe["rm"])
    return lambda: stages.run_lm(cfg, wd, "sft"), (
        f"config train.init_from={pipe['rm']!r}: parameters differ from the configured model (different "
        "architecture?): missing [\"['embed']['embedding']\"")
  if name == "global batch not divisible by devices":
    cfg = pre(**{"data.batch_size": 6})
    return lambda: stages.run_lm(cfg, wd, "pretrain"), (
        "data.batch_size=6 gives 6 rows per host, not divisible by the host's batch shards (4: mesh.data × mesh.fsdp / "
        "process_count; by default its local devices)")
  if name == "global batch not divisible by data × fsdp":
    cfg = pre(**{"data.batch_size": 5, "mesh.fsdp": 2, "mesh.data": 1, "mesh.tensor": 2})
    return lambda: stages.run_lm(cfg, wd, "pretrain"), ("data.batch_size=5 gives 5 rows per host, not divisible by "
                                                        "the host's batch shards (2:")
  if name == "mesh product != device count":
    cfg = pre(**{"mesh.data": 3})
    return lambda: stages.run_lm(cfg, wd, "pretrain"), ("config mesh.data=3, mesh.fsdp=1, mesh.tensor=1: the product 3 "
                                                        "must equal the device count (4)")
  if name == "model.num_heads not divisible by mesh.tensor":
    cfg = pre(**{"mesh.tensor": 4})
    return lambda: stages.run_lm(cfg, wd, "pretrain"), "config model.num_heads=2 is not divisible by config mesh.tensor=4"
  if name == "data.seq_len > model.max_len":
    cfg = pre(**{"data.seq_len": 100, "tokenizer.path": pre_tok})
    return lambda: stages.run_lm(cfg, wd, "pretrain"), "config data.seq_len=100 exceeds model.max_len=64"
  ppo_cfg = fixtures.ppo_cfg(pipe, pipe["sft"], pipe["rm"])
  if name == "ppo prompt_len + max_new_tokens > max_len":
    cfg = _with(ppo_cfg, **{"data.prompt_len": 60, "ppo.max_new_tokens": 12})
    return lambda: ppo.run(cfg, wd), ("config data.prompt_len=60 + ppo.max_new_tokens=12 = 72 exceeds the "
                                      "policy's max_len=64")
  if name == "ppo rollout_batch not divisible by devices":
    cfg = _with(ppo_cfg, **{"ppo.rollout_batch": 6})
    return lambda: ppo.run(cfg, wd), ("config ppo.rollout_batch=6 must be a positive multiple of the batch shards "
                                      "(mesh.data × mesh.fsdp = 4 × 1 = 4)")
  if name == "ppo reward_from not a reward model":
    cfg = _with(ppo_cfg, **{"ppo.reward_from": pipe["sft"]})
    return lambda: ppo.run(cfg, wd), (f"config ppo.reward_from={pipe['sft']!r} is not a reward-model workdir (its checkpoint says "
                                      "stage='sft')")
  raise KeyError(name)


def _with(cfg, **overrides):
  """cfg with dotted `section.field` overrides applied."""
  for key, value in overrides.items():
    section, field = key.split(".")
    cfg[section][field] = value
  return cfg


BAD_INPUTS = ["missing data file", "empty data file", "malformed JSONL line", "comparison with K < 2",
              "reward loss.lm_coef < 0",
              "tokenizer vocab != model.vocab_size", "tokenizer vocab != init_from vocab",
              "init_from a different architecture (RM workdir into SFT)", "global batch not divisible by devices",
              "global batch not divisible by data × fsdp", "mesh product != device count",
              "model.num_heads not divisible by mesh.tensor",
              "data.seq_len > model.max_len", "ppo prompt_len + max_new_tokens > max_len",
              "ppo rollout_batch not divisible by devices", "ppo reward_from not a reward model"]


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_a_clear_error_and_writes_no_checkpoint(name, pipe, tok96, tmp_path):
  run, message = _bad_case(name, pipe, tok96, tmp_path)
  with pytest.raises(ValueError) as e:
    run()
  print(f"| {name} | `{e.value}` |")
  assert str(e.value).startswith(message), str(e.value)
  assert not checkpoint.has_checkpoint(str(tmp_path / "wd"))


def test_ppo_init_from_a_reward_model_workdir_names_the_field(pipe, tmp_path):
  cfg = fixtures.ppo_cfg(pipe, pipe["rm"], pipe["rm"])
  with pytest.raises(ValueError, match="train.init_from"):
    ppo.run(cfg, str(tmp_path / "wd"))


def test_check_same_structure_names_the_parameter_and_both_shapes():
  base = dict(vocab_size=40, d_model=32, num_heads=2, num_kv_heads=2, d_ff=64, num_layers=1, max_len=16)
  shapes = lambda **kw: jax.eval_shape(lambda: init_params(TransformerConfig(**{**base, **kw}), jax.random.PRNGKey(0)))
  small, wide, deep = shapes(), shapes(d_model=48), shapes(num_layers=2)
  with pytest.raises(ValueError, match=re.escape("src: parameter ['embed']['embedding'] has shape (40, 48), the "
                                                 "configured model expects (40, 32) (different architecture?)")):
    checkpoint.check_same_structure(small, wide, "src")
  with pytest.raises(ValueError, match=re.escape("src: parameters differ from the configured model (different "
                                                 "architecture?): missing [], unexpected [\"['layer_1']")):
    checkpoint.check_same_structure(small, deep, "src")
  checkpoint.check_same_structure(small, shapes(), "src")  # same structure: no error
