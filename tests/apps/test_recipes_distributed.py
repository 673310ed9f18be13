"""The recipes' --nproc (issue 12): a batch that does not split over the ranks is refused naming the key,
recipes that run in one process refuse --nproc, the launcher kills a hanging rank, and a tiny two-rank run of
the Fig. 2 recipe trains with rank 0 alone writing.  (The library's two-rank equality with one process is
tested in tests/training/test_distributed.py.)"""
import pytest

from recipes import cli, hessian_after_pruning, launch, quadratic_ode, train_resnet_cifar100
from recipes.config import ConfigError


def test_a_batch_that_does_not_split_over_the_ranks_is_refused_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "world", lambda: 2)      # as on each rank of a 2-rank run
    with pytest.raises(ConfigError, match=r"train.batch_size = 255 does not split over 2 ranks"):
        train_resnet_cifar100.main(["--config", "configs/train_resnet_cifar100_cpu.yaml",
                                    "--out", str(tmp_path / "run"), "--no-progress", "train.batch_size=255"])
    with pytest.raises(ConfigError, match=r"hessian.batch_size = 511 does not split over 2 ranks"):
        hessian_after_pruning.main(["--config", "configs/hessian_after_pruning_cpu.yaml",
                                    "--out", str(tmp_path / "run"), "hessian.batch_size=511"])
    assert not (tmp_path / "run").exists()       # nothing written


def test_one_process_recipes_refuse_nproc(tmp_path):
    with pytest.raises(ConfigError, match="--nproc 2: recipes.quadratic_ode runs in one process"):
        quadratic_ode.main(["--nproc", "2", "--out", str(tmp_path / "q")])
    with pytest.raises(ConfigError, match="--nproc must be an integer >= 1"):
        train_resnet_cifar100.main(["--nproc", "0", "--out", str(tmp_path / "r")])


def test_shard_without_a_group_is_the_whole_batch():
    batch = (list(range(6)), list(range(6)))
    assert launch.shard(batch) is batch and launch.world() == 1 and launch.rank() == 0 and launch.is_rank0()
    assert launch.group() is None and cli.maybe_spawn("x:y", ["--nproc", "1"], "x") is None


def sleeper(rank, world):
    """Rank 1 never returns (a hang); rank 0 does."""
    import time

    if rank == 1:
        time.sleep(600)
    return rank


def test_a_hanging_rank_is_killed_and_reported_not_waited_for():
    import time

    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[(0, )?1\] still running after 10 s"):
        launch.spawn("tests.apps.test_recipes_distributed:sleeper", 2, timeout=10)
    assert time.monotonic() - t0 < 40


def test_a_two_rank_run_of_the_fig2_recipe_trains_and_rank_0_alone_writes(tmp_path):
    """What ``--nproc 2`` spawns, under a deadline: a hang fails the test instead of blocking CI."""
    import functools
    import json

    from tests.apps.test_recipe_train_resnet import TINY

    out = tmp_path / "run"
    argv = ["--out", str(out), "qode.mode=quantum", "train.twin=true"] + TINY     # the twin under DDP too
    res = launch.spawn(functools.partial(launch.recipe_rank, "recipes.train_resnet_cifar100:main"), 2,
                       (argv, {}), threads=1, timeout=300)
    rows = res[0]["result"]["rows"]
    assert [r["cycle"] for r in rows] == [0, 1] and all(r["mode"] == "quantum" for r in rows)
    assert all(r["drift"] is not None and 0 <= r["acc"] <= 1 and 0 <= r["acc_twin"] <= 1 for r in rows)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len([e for e in log if e["event"] == "cycle"]) == 2       # one writer: rank 0
    assert res[1]["result"]["rows"] == []                              # the table is rank 0's
