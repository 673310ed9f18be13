"""The recipes' --nproc (issue 12): refusals reach the command line from every rank, and recipes that
run in one process refuse --nproc.  (Full two-rank recipe runs are checked by hand, see the README:
they take minutes; the library's two-rank equality is tested in tests/training/test_distributed.py.)"""
import pytest

from recipes import launch, quadratic_ode, train_resnet_cifar100
from recipes.config import ConfigError


def test_a_batch_that_does_not_split_over_the_ranks_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train.batch_size = 255 does not split over 2 ranks"):
        train_resnet_cifar100.main(["--config", "configs/train_resnet_cifar100_cpu.yaml", "--nproc", "2",
                                    "--out", str(tmp_path / "run"), "--no-progress", "train.batch_size=255"])
    assert not (tmp_path / "run").exists()       # nothing written


def test_one_process_recipes_refuse_nproc(tmp_path):
    with pytest.raises(ConfigError, match="--nproc 2: recipes.quadratic_ode runs in one process"):
        quadratic_ode.main(["--nproc", "2", "--out", str(tmp_path / "q")])
    with pytest.raises(ConfigError, match="--nproc must be an integer >= 1"):
        train_resnet_cifar100.main(["--nproc", "0", "--out", str(tmp_path / "r")])


def test_shard_without_a_group_is_the_whole_batch():
    batch = (list(range(6)), list(range(6)))
    assert launch.shard(batch) is batch and launch.world() == 1 and launch.rank() == 0 and launch.is_rank0()
    assert launch.group() is None and launch.maybe_spawn("x:y", ["--nproc", "1"], "x") is None
