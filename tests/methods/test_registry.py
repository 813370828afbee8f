"""methods.registry: suffixes in label order, each method's label checks, and no torch to look one up."""

import subprocess
import sys
from types import SimpleNamespace

import pytest

from lowbit.errors import InputError
from lowbit.methods import registry
from lowbit.methods.registry import BLOCK, HESSIAN, NOTHING, Method, method_for, ordered, register, suffixes


def test_suffixes_in_label_order():
    assert suffixes() == ("+awq", "+had", "+gptq", "+cb")
    assert ordered({"+cb", "+gptq", "+awq"}) == ("+awq", "+gptq", "+cb")
    assert [method_for(s).needs for s in suffixes()] == [BLOCK, NOTHING, HESSIAN, HESSIAN]
    assert [method_for(s).prequantizes for s in suffixes()] == [False, False, True, False]


def test_lookup_imports_no_torch():
    code = ("import sys; from lowbit.methods.registry import method_for, suffixes; "
            "[method_for(s) for s in suffixes()]; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def config(fmt="nf4", search=None, methods=()):
    return SimpleNamespace(format=fmt, search=search, methods=methods)


@pytest.mark.parametrize("suffix, cfg, message", [
    ("+had", config(search="amse", methods=("+had",)), "+had with @amse needs +gptq"),
    ("+cb", config("lloyd4", methods=("+cb",)), "+cb refits the codebook to the layer's output error"),
    ("+cb", config("nf4", methods=("+gptq", "+cb")), "nf4 has none"),
    ("+gptq", config("q4_0", methods=("+gptq",)), "GPTQ needs a format whose elements are levels on a grid"),
])
def test_refused_combinations(suffix, cfg, message):
    with pytest.raises(InputError, match=message.replace("+", r"\+")):
        method_for(suffix).check(cfg)


@pytest.mark.parametrize("suffix, cfg", [
    ("+had", config(search="amse", methods=("+had", "+gptq"))), ("+had", config(search="mse", methods=("+had",))),
    ("+cb", config("lloyd4", methods=("+gptq", "+cb"))), ("+gptq", config("int4", methods=("+gptq",))),
    ("+awq", config(methods=("+awq",)))])
def test_accepted_combinations(suffix, cfg):
    method_for(suffix).check(cfg)


def test_unknown_suffix():
    with pytest.raises(InputError, match="unknown method '\\+xyz'"):
        method_for("+xyz")


def test_a_method_registered_from_elsewhere_comes_last(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTERED", dict(registry._REGISTERED))

    @register
    class Toy(Method):
        suffix = "+toy"

    assert method_for("+toy") is Toy
    assert suffixes()[-1] == "+toy"
    assert ordered({"+toy", "+awq"}) == ("+awq", "+toy")

    class Bad(Method):
        suffix = "+Bad"

    with pytest.raises(RuntimeError, match="lower-case"):
        register(Bad)


def test_signs_only_for_hadamard():
    assert method_for("+gptq").layer_signs("a.b", 8) is None
    signs = method_for("+had").layer_signs("a.b", 8)
    assert signs.shape == (8,)
