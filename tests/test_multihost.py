"""Multi-host: 2 processes x 2 CPU devices (gloo collectives over 127.0.0.1) against 1 process x 4 devices.

The processes are real `python -m experiments.pretrain` jobs joined with --coordinator_address/--num_processes/
--process_id. The data-sharding tests below run the loaders in-process for hosts 0 and 1 of 2.
"""
import os
import sys

import jax
import numpy as np
import pytest

import faults_driver as fd  # tests/ is on sys.path under pytest
from rlhf_jax import checkpoint, data, tokenizer

SPM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", "spm", "spm.model")
SEQ_LEN, BATCH, DOCS, STEPS = 32, 8, 64, 12


def one_row_documents(tok: tokenizer.Tokenizer, lines: list[str], seq_len: int, n: int) -> list[str]:
  """`n` documents cut (at a space) to exactly seq_len - 1 tokens, so [bos] + ids + [eos] fills one row."""
  out = []
  for line in lines:
    words = line.split()
    for k in range(len(words), 0, -1):
      text = " ".join(words[:k])
      if len(tok.encode(text)) == seq_len - 1:
        out.append(text)
        break
    if len(out) == n:
      return out
  raise AssertionError(f"only {len(out)} of {n} documents could be cut to {seq_len - 1} tokens")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("multihost"))
  return root, fd.task_files(root)


def _overrides(corpus: str) -> dict:
  return {"data.train": corpus, "data.seq_len": SEQ_LEN, "data.batch_size": BATCH, "tokenizer.path": SPM,
          "train.num_steps": STEPS, "train.checkpoint_every": 4, "train.log_every": 1,
          "opt.warmup_steps": 2, "opt.lr": 3e-3, **fd.TINY_MODEL}


def test_two_processes_of_two_devices_train_like_one_process_of_four(task):
  """2 processes × 2 devices, data parallel and with fsdp spanning the processes (mesh.fsdp=4: each process holds
  half of every matrix and writes its own shards), train like 1 process × 4 devices (data parallel)."""
  root, files = task
  tok = tokenizer.load_tokenizer(SPM)
  with open(files["corpus"]) as f:
    docs = one_row_documents(tok, f.read().splitlines(), SEQ_LEN, DOCS)
  corpus = os.path.join(root, "one_row_docs.txt")
  with open(corpus, "w") as f:
    f.write("\n".join(docs) + "\n")
  single = os.path.join(root, "single")
  multis = {os.path.join(root, "multi"): {}, os.path.join(root, "multi-fsdp"): {"mesh.fsdp": 4}}
  job = fd.Background(fd.command("pretrain", single, _overrides(corpus)), fd.stage_env(4), single + ".log")
  try:
    outs = {wd: fd.run_processes(fd.multihost_commands("pretrain", wd, {**_overrides(corpus), **mesh}, 2,
                                                       fd.free_port()), fd.stage_env(2), wd, timeout=240)
            for wd, mesh in multis.items()}
  finally:
    one = job.wait(240)
  assert one.returncode == 0, one.tail()
  rows1 = fd.metric_rows(single)  # process 0 alone writes metrics
  loss1 = np.array([r["train_loss"] for r in rows1])
  assert loss1[-1] < loss1[0] - 0.1  # it trained
  p1, _ = checkpoint.load_params(single)
  for multi, mesh in multis.items():
    for i, out in enumerate(outs[multi]):
      assert out.returncode == 0, out.tail()
      assert f"process {i}/2: 2 local devices (cpu), 4 global" in out.log
      assert ("mesh data=1 × fsdp=4 × tensor=1" if mesh else "mesh data=4 × fsdp=1 × tensor=1") in out.log
    rows2 = fd.metric_rows(multi)
    assert [r["step"] for r in rows2] == [r["step"] for r in rows1] == list(range(1, STEPS + 1))
    np.testing.assert_allclose(np.array([r["train_loss"] for r in rows2]), loss1, rtol=1e-5)
    assert fd.finished_steps(multi) == [8, 12]
    p2, extra = checkpoint.load_params(multi)  # written shard by shard by 2 processes, read here by 1
    for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p1)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert extra["data"]["records"] == DOCS  # every host packs the global record order (one state resumes all)


LATE_HOST = """import runpy, sys, time
from rlhf_jax import stages
delay, module, sys.argv = float(sys.argv[1]), sys.argv[2], sys.argv[2:]
resolve_init = stages.resolve_init
def late_resolve_init(*args, **kwargs):
  time.sleep(delay)  # this host reaches the resume check late (slow disk, slow imports...)
  return resolve_init(*args, **kwargs)
stages.resolve_init = late_resolve_init
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def test_a_late_host_on_a_fresh_workdir_still_trains(task):
  """Process 1 reaching the stage 4 s after process 0 (a slow host) on a fresh shared workdir must still train."""
  root, files = task
  workdir = os.path.join(root, "late-host")
  o = {**_overrides(files["corpus"]), "train.num_steps": 2, "train.checkpoint_every": 2}
  cmds = fd.multihost_commands("pretrain", workdir, o, 2, fd.free_port())
  cmds[1] = [cmds[1][0], "-c", LATE_HOST, "4"] + cmds[1][2:]  # python -c LATE_HOST 4 experiments.pretrain --...
  outs = fd.run_processes(cmds, fd.stage_env(2), workdir, timeout=120, grace=5)
  for out in outs:
    assert out.returncode == 0, out.tail(1500)


BUILD_CACHE = """import sys, time
from rlhf_jax import data
generate = data.LocalRecords._generate_examples
def slow_generate(self):
  time.sleep(float(sys.argv[1]))
  return generate(self)
data.LocalRecords._generate_examples = slow_generate
print("records", len(data.Records([sys.argv[2]], "text", sys.argv[3])), flush=True)
"""


def test_two_processes_building_the_data_cache_of_one_workdir_both_get_it(task):
  """Hosts build workdir/tfds/... at once; the one that finishes last finds the other's build and uses it."""
  root, files = task
  workdir = os.path.join(root, "tfds-race")
  cmds = [[sys.executable, "-c", BUILD_CACHE, delay, files["corpus"], workdir] for delay in ("2", "4")]
  outs = fd.run_processes(cmds, fd.stage_env(1), workdir, timeout=120, grace=5)
  for out in outs:
    assert out.returncode == 0, out.tail(1500)
    assert "Downloading and preparing dataset" in out.log  # both started a build of the same directory
    assert "records 400" in out.log
  assert "downloaded and prepared" in outs[0].log and "downloaded and prepared" not in outs[1].log


# ------------------------------------------------------------------------------- per-host data sharding


def _loaders(kind: str, files: dict, workdir: str, process_count: int):
  """Training loaders of every host of `process_count` for a global batch of BATCH rows (1 device per host)."""
  tok = tokenizer.load_tokenizer(SPM)
  common = dict(tokenizer=tok, batch_size=BATCH, seed=0, workdir=workdir, process_count=process_count,
                local_device_count=1)
  make = {"text": lambda i: data.make_lm_loader(files["corpus"], seq_len=SEQ_LEN, process_index=i, **common),
          "sft": lambda i: data.make_sft_loader(files["demonstrations"], seq_len=64, process_index=i, **common),
          "comparison": lambda i: data.make_comparison_loader(files["comparisons"], seq_len=64, max_responses=4,
                                                              process_index=i, **common),
          "prompt": lambda i: data.make_prompt_loader(files["rl_prompts"], prompt_len=32, process_index=i,
                                                      **common)}[kind]
  return [make(i) for i in range(process_count)]


def _rows(batches: list[dict]) -> list[bytes]:
  """The rows of host batches as sorted byte strings (a multiset: row order within a batch does not matter)."""
  out = []
  for b in batches:
    arrays = [np.asarray(v) for v in b.values() if isinstance(v, np.ndarray)]
    out += [b"".join(a[i].tobytes() for a in arrays) for i in range(arrays[0].shape[0])]
  return sorted(out)


@pytest.mark.parametrize("kind", ["text", "sft", "comparison", "prompt"])
def test_two_hosts_global_batch_has_the_rows_of_one_host(task, kind):
  root, files = task
  one, = _loaders(kind, files, os.path.join(root, "data"), 1)
  hosts = _loaders(kind, files, os.path.join(root, "data"), 2)
  for step in range(5):
    assert _rows([next(h) for h in hosts]) == _rows([next(one)]), f"global batch {step} differs"


def test_every_host_resumes_its_own_stream_from_the_saved_loader_state(task):
  root, files = task
  hosts = _loaders("text", files, os.path.join(root, "data"), 2)
  for _ in range(3):
    for h in hosts:
      next(h)
  saved = hosts[0].get_state()  # what the checkpoint holds
  fresh = _loaders("text", files, os.path.join(root, "data"), 2)
  for i, h in enumerate(fresh):
    h.set_state(saved)
    assert _rows([next(h)]) == _rows([next(hosts[i])]), f"host {i} resumed another stream"
