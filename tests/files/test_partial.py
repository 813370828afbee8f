"""OUT.partial: an interrupted output's finished shards, continued only with the same settings, locked while a
run writes it, and never mistaken for (or deleted over) a user's directory."""

import json

import pytest
import torch
from safetensors.torch import save_file

from lowbit.errors import InputError
from lowbit.files.partial import Partial, ProducerState, check_leftover, finished_shards, partial_path

SETTINGS = {"--format/--plan": "nf4", "the plan's rules": {"rules": [{"pattern": "*", "format": "nf4"}]},
            "--shard-size": 1000}


def interrupted(out, shards: int = 2) -> None:
    """What a run killed after ``shards`` finished shards leaves."""
    with Partial.open(out, SETTINGS, resume=False, overwrite=False) as partial:
        for i in range(shards):
            partial.add_shard([f"t{i}"], 16, lambda path, i=i: save_file({f"t{i}": torch.full((4,), float(i))}, path),
                              ProducerState(info={"done": i + 1}))


def test_a_resume_goes_on_from_the_last_finished_shard_with_the_same_settings(tmp_path):
    out = tmp_path / "out"
    interrupted(out)
    assert partial_path(out) == tmp_path / "out.partial" and finished_shards(out) == 2
    (tmp_path / "out.partial" / ".shard-00003.safetensors.1_abcdefgh.tmp").write_bytes(b"half a shard")
    (tmp_path / "out.partial" / "shard-00003.safetensors").write_bytes(b"written, never recorded")
    (tmp_path / "out.partial" / ".tmpK1ll3d").write_bytes(b"safetensors' own temp, half written")
    with Partial.open(out, dict(SETTINGS), resume=True, overwrite=False) as partial:
        assert [s["tensors"] for s in partial.shards] == [["t0"], ["t1"]] and partial.state().info == {"done": 2}
        assert sorted(p.name for p in partial.directory.iterdir()) == [
            "manifest.json", "shard-00001.safetensors", "shard-00002.safetensors"]  # the rest goes
        partial.remove()
    assert finished_shards(out) is None


@pytest.mark.parametrize(("change", "said"), [
    ({"--format/--plan": "q4_0"}, r"\(--format/--plan: nf4 then, q4_0 now\)"),
    ({"--shard-size": 2000}, r"\(--shard-size: 1000 then, 2000 now\)"),
    ({"the plan's rules": {"rules": [{"pattern": "mlp.*", "format": "nf4"}] * 9}}, r"\(the plan's rules differs\)"),
    ({"torch": "2.14.0"}, r"\(torch: None then, 2.14.0 now\)"),
])
def test_a_resume_with_other_settings_is_refused_naming_what_differs(tmp_path, change, said):
    interrupted(tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out.partial").iterdir()}
    with pytest.raises(InputError, match=said + ": give it those to continue it, or drop --resume and pass "
                                              "--overwrite to start over"):
        Partial.open(tmp_path / "out", SETTINGS | change, resume=True, overwrite=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out.partial").iterdir()} == before


def test_finished_shards_are_refused_without_resume_and_discarded_with_overwrite(tmp_path):
    out = tmp_path / "out"
    interrupted(out)
    with pytest.raises(InputError, match=r"out.partial holds 2 finished shards of an interrupted run writing .*out: "
                                         "pass --resume to continue it, or --overwrite to discard it"):
        Partial.open(out, SETTINGS, resume=False, overwrite=False)
    with Partial.open(out, SETTINGS | {"--shard-size": 5}, resume=False, overwrite=True) as partial:
        assert partial.shards == [] and partial.state() is None
    assert not partial_path(out).exists()  # a partial that finished nothing is not left behind


def test_one_run_at_a_time(tmp_path):
    with Partial.open(tmp_path / "out", SETTINGS, resume=False, overwrite=False), \
            pytest.raises(InputError, match="another lowbit run is writing .*out.partial now"):
        Partial.open(tmp_path / "out", SETTINGS, resume=True, overwrite=True)


def test_a_users_directory_in_the_way_is_never_touched(tmp_path):
    mine = tmp_path / "out.partial"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for resume, overwrite in [(False, False), (True, False), (False, True)]:
        with pytest.raises(InputError, match="out.partial is in the way: .* holds notes.txt, which lowbit did not "
                                             "write; move it"):
            Partial.open(tmp_path / "out", SETTINGS, resume=resume, overwrite=overwrite)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    (mine / "notes.txt").unlink()
    (tmp_path / "out.partial" / "manifest.json").write_text(json.dumps({"lowbit_partial": 99}))
    with pytest.raises(InputError, match="written by another lowbit .*: pass --overwrite to discard it"):
        check_leftover(tmp_path / "out", resume=True, overwrite=False)


def test_a_partial_whose_output_was_completed_goes(tmp_path):
    """Killed after the output was renamed into place, before its partial was removed: the output is complete."""
    out = tmp_path / "out"
    interrupted(out)
    out.mkdir()
    for i in (1, 2):
        (out / f"model-0000{i}-of-00002.safetensors").hardlink_to(partial_path(out) / f"shard-0000{i}.safetensors")
    assert check_leftover(out, resume=False, overwrite=False) is None
    assert not partial_path(out).exists() and len(list(out.iterdir())) == 2


def test_what_someone_put_in_a_partial_stays_when_it_goes(tmp_path):
    interrupted(tmp_path / "out")
    partial = Partial.open(tmp_path / "out", SETTINGS, resume=True, overwrite=False)
    (partial.directory / "notes.txt").write_text("mine")
    partial.remove()  # the output is complete: no error for it, and only lowbit's files go
    assert [p.name for p in partial.directory.iterdir()] == ["notes.txt"]
