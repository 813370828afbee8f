"""A calibration pass continued from the end of any block runs no block before it and finds, to the bit, what the
uninterrupted pass finds (the Toy of test_engine; a calibrated quantize killed and resumed: tests/io/test_resume.py).
"""

from lowbit.calibration.engine import serve
from lowbit.files.partial import ProducerState

from .test_engine import Toy, assert_equal, toy_batches


def test_a_pass_continued_from_a_blocks_end_runs_no_block_before_it_and_finds_the_same():
    """Importance of a layer in every block and of the head after them (replayed from the last block's outputs),
    continued from each block's end: the blocks before are not run, and every statistic is the uninterrupted
    pass's, to the bit."""
    from lowbit.calibration.importance import Importance

    model, data = Toy(), toy_batches()
    names = ["layers.0.a", "layers.1.a", "layers.2.a", "head"]
    states = []
    whole = Importance(names)
    serve(model, data, [whole], progress=False,
          at_boundary=lambda s: states.append(ProducerState({k: t.clone() for k, t in s.tensors.items()}, s.info)))
    assert [s.info["blocks"] for s in states] == [1, 2, 3]
    ran = []
    hooks = [block.register_forward_hook(lambda m, a, out, i=i: ran.append(i)) for i, block in enumerate(model.layers)]
    for state in states:
        ran.clear()
        again = Importance(names)
        serve(model, data, [again], progress=False, resumed=state)
        assert set(ran) == set(range(state.info["blocks"], 3))
        assert_equal({n: again.found[n] for n in names}, {n: whole.found[n] for n in names})
    for h in hooks:
        h.remove()
