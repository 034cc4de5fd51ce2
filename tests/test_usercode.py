"""Loading user programs named as `script.py:NAME` or `package.module:NAME`."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from pyrovae.errors import PyrovaeError
from pyrovae.usercode import build_program, describe, is_spec, load_object

VAE_SCRIPT = """
import pyro
import pyro.distributions as dist
import torch
from torch import nn


class VAE(nn.Module):
    def __init__(self, data_shape, latent=3):
        super().__init__()
        self.data_shape = data_shape
        self.latent = latent
        self.net = nn.Linear(latent, data_shape[-1])

    def forward(self, x):
        pyro.module("vae", self)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(len(x), self.latent), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.net(z)).to_event(1), obs=x)


def make_model(data_shape, hidden=16):
    model = VAE(data_shape)
    model.hidden = hidden
    return model


def model(x):
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Bernoulli(0.5 * torch.ones_like(x)).to_event(1), obs=x)


class Outer:
    class Inner:
        pass


NUMBER = 7
"""


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(PyrovaeError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message
    return message


@pytest.fixture
def script(tmp_path: Path) -> Path:
    return write(tmp_path / "scripts", "vae_script.py", VAE_SCRIPT)


@pytest.mark.parametrize("name, expected", [
    ("vae", False), ("iaf", False), ("hvae", False), ("diagonal", False), ("elbo-analytic", False),
    ("model.py", False), ("", False), (":", False), ("vae:", True),
    ("model.py:VAE", True), ("./scripts/m2.py:SSVAE", True), ("/abs/path/x.py:make", True),
    ("my_pkg.models:VAE", True), ("models:VAE", True), ("my_pkg.models:Outer.inner", True),
    ("./scripts/m2.txt:SSVAE", True), ("not a module:VAE", False), ("elbo-analytic:x", False),
    ("1pkg.models:VAE", False),
])
def test_is_spec(name, expected):
    assert is_spec(name) is expected


def test_class_is_built_with_the_keywords_it_accepts(script):
    program = build_program(f"{script}:VAE", (1, 10), latent=4, hidden=99, prior="standard")
    assert type(program).__name__ == "VAE" and isinstance(program, nn.Module)
    assert program.data_shape == (1, 10) and program.latent == 4
    assert not hasattr(program, "hidden")  # not accepted, so not passed
    assert program.net.out_features == 10


def test_factory_is_called(script):
    program = build_program(f"{script}:make_model", (10,), hidden=32, latent=5)
    assert type(program).__name__ == "VAE" and program.hidden == 32 and program.latent == 3


def test_marked_factory_and_star_kwargs(tmp_path):
    path = write(tmp_path, "marked.py", """
        from pyrovae.usercode import factory

        @factory
        def program(**options):
            def model(x):
                return options
            return model

        def plain(data_shape=None):
            return "not called"
    """)
    built = build_program(f"{path}:program", (2, 3), hidden=8)
    assert built(None) == {"data_shape": (2, 3), "hidden": 8}
    plain = build_program(f"{path}:plain", (2, 3))
    assert plain.__name__ == "plain"


def test_plain_model_function_is_returned_as_is(script):
    fn = build_program(f"{script}:model", (10,))
    assert fn is load_object(f"{script}:model") and fn.__name__ == "model"
    x = torch.ones(4, 10)
    fn(x)  # runs as a Pyro model


def test_instance_is_returned_as_is(tmp_path):
    path = write(tmp_path, "inst.py", """
        from torch import nn
        decoder = nn.Linear(2, 3)
        config = {"a": 1}
    """)
    assert build_program(f"{path}:decoder", (3,)) is load_object(f"{path}:decoder")
    message = error_of(build_program, f"{path}:config", (3,))
    assert "is a dict, not a Pyro program" in message


def test_factory_returning_none_and_raising(tmp_path):
    path = write(tmp_path, "bad_factory.py", """
        def make_nothing(data_shape):
            return None

        def build_broken(data_shape):
            raise ValueError("bad shape\\nsecond line")
    """)
    assert "returned NoneType, not a Pyro program" in error_of(build_program, f"{path}:make_nothing", (3,))
    message = error_of(build_program, f"{path}:build_broken", (3,))
    assert "building build_broken" in message and "ValueError: bad shape" in message
    assert "second line" not in message


def test_required_arguments_that_cannot_be_supplied(tmp_path):
    path = write(tmp_path, "needs.py", """
        class Needs:
            def __init__(self, data_shape, depth, width, scale=1.0):
                pass

        def make_positional(n, /, data_shape):
            pass
    """)
    message = error_of(build_program, f"{path}:Needs", (3,), width=4)
    assert "requires depth, which" in message
    message = error_of(build_program, f"{path}:Needs", (3,))
    assert "requires depth, width, which" in message
    assert "requires n, which" in error_of(build_program, f"{path}:make_positional", (3,), n=1)


def test_same_file_twice_is_cached(script):
    first = load_object(f"{script}:VAE")
    again = load_object(f"{script.parent}/../scripts/{script.name}:VAE")  # another spelling of the path
    assert first is again
    assert sys.modules[first.__module__].__file__ == str(script)


def test_files_with_the_same_name_do_not_collide(tmp_path):
    a = write(tmp_path / "a", "model.py", "WHO = 'a'\nclass VAE:\n    pass\n")
    b = write(tmp_path / "b", "model.py", "WHO = 'b'\nclass VAE:\n    pass\n")
    assert (load_object(f"{a}:WHO"), load_object(f"{b}:WHO")) == ("a", "b")
    vae_a, vae_b = load_object(f"{a}:VAE"), load_object(f"{b}:VAE")
    assert vae_a is not vae_b and vae_a.__module__ != vae_b.__module__
    assert "model" not in sys.modules or getattr(sys.modules["model"], "__file__", None) not in (str(a), str(b))


def test_relative_path_and_dotted_attribute(script, monkeypatch):
    monkeypatch.chdir(script.parent.parent)
    inner = load_object(f"./scripts/{script.name}:Outer.Inner")
    assert inner.__qualname__ == "Outer.Inner"
    assert load_object(f"scripts/{script.name}:NUMBER") == 7


def test_sibling_import_works_and_sys_path_is_restored(tmp_path):
    folder = tmp_path / "sib"
    write(folder, "usercode_helper_sibling.py", "class Encoder:\n    width = 12\n")
    path = write(folder, "main_script.py", """
        import sys
        from usercode_helper_sibling import Encoder
        sys.path.append("/added/by/script")

        class Model:
            encoder = Encoder
    """)
    before = list(sys.path)
    try:
        model = load_object(f"{path}:Model")
        assert model.encoder.width == 12
        assert str(folder) not in sys.path
        assert sys.path == before + ["/added/by/script"]  # only our entry is taken out
    finally:
        sys.path[:] = before
        sys.modules.pop("usercode_helper_sibling", None)


def test_dotted_module_spec(tmp_path, monkeypatch):
    package = tmp_path / "site" / "usercode_pkg"
    write(package, "__init__.py", "")
    write(package, "models.py", VAE_SCRIPT)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    try:
        vae = load_object("usercode_pkg.models:VAE")
        assert vae.__module__ == "usercode_pkg.models"
        program = build_program("usercode_pkg.models:make_model", (6,), hidden=2)
        assert program.net.out_features == 6 and program.hidden == 2
        assert describe("usercode_pkg.models:VAE") == "usercode_pkg.models:VAE"
    finally:
        for name in ("usercode_pkg", "usercode_pkg.models"):
            sys.modules.pop(name, None)


def test_describe(script, monkeypatch):
    monkeypatch.chdir(script.parent)
    canonical = describe(f"{script.name}:VAE")
    assert canonical == f"{script}:VAE" and os.path.isabs(canonical.rsplit(":", 1)[0])
    assert describe("vae") == "vae"
    monkeypatch.chdir("/")  # a later run from elsewhere rebuilds the same program
    assert load_object(canonical) is load_object(f"{script}:VAE")


def test_missing_file_and_not_python(tmp_path):
    message = error_of(load_object, f"{tmp_path}/nope.py:VAE")
    assert message == f"no such file: {tmp_path}/nope.py"
    text = write(tmp_path, "model.txt", "x = 1\n")
    assert "not a Python file" in error_of(load_object, f"{text}:x") and str(text) in error_of(load_object, f"{text}:x")
    assert "not a Python file" in error_of(load_object, f"{tmp_path}/:x")


def test_bad_specs(script):
    assert "names no object after ':'" in error_of(load_object, f"{script}:")
    assert "not a (dotted) Python name" in error_of(load_object, f"{script}:not-a-name")
    assert "is not a spec" in error_of(load_object, "vae")


def test_script_raising_during_import(tmp_path):
    path = write(tmp_path, "raises.py", """
        import torch

        raise RuntimeError("weights missing\\nmore detail")
    """)
    message = error_of(load_object, f"{path}:VAE")
    assert message == f"{path} (line 4) raised while being imported: RuntimeError: weights missing"
    assert not any(getattr(m, "__file__", None) == str(path) for m in list(sys.modules.values()))
    path.write_text("VAE = 3\n")  # fixed: a retry imports it afresh
    assert load_object(f"{path}:VAE") == 3


def test_script_with_syntax_error_or_exit(tmp_path):
    broken = write(tmp_path, "broken.py", "x = 1\ndef f(:\n    pass\n")
    message = error_of(load_object, f"{broken}:f")
    assert str(broken) in message and "(line 2)" in message and "SyntaxError" in message
    exits = write(tmp_path, "exits.py", "import sys\nsys.exit(2)\n")
    assert "SystemExit: 2" in error_of(load_object, f"{exits}:x")


def test_missing_attribute_suggests_close_names(script):
    message = error_of(load_object, f"{script}:VEA")
    assert message.startswith(f"{script} has no attribute 'VEA'; did you mean VAE?")
    assert "(it has: NUMBER, Outer, VAE, make_model, model)" in message  # imports (torch, nn, pyro) left out
    message = error_of(load_object, f"{script}:Outer.Iner")
    assert "Outer in " in message and "did you mean Inner?" in message


def test_missing_attribute_lists_at_most_ten(tmp_path):
    path = write(tmp_path, "many.py", "".join(f"name_{i:02d} = {i}\n" for i in range(15)))
    message = error_of(load_object, f"{path}:nothing_like_it")
    assert "did you mean" not in message
    assert "name_09, ...)" in message and "name_10" not in message


def test_module_not_importable(tmp_path, monkeypatch):
    message = error_of(load_object, "no_such_pkg_xyz.models:VAE")
    assert "cannot import module 'no_such_pkg_xyz.models': no module named 'no_such_pkg_xyz'" in message
    package = tmp_path / "usercode_broken_pkg"
    write(package, "__init__.py", "")
    write(package, "models.py", "import a_dependency_that_is_not_there\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        message = error_of(load_object, "usercode_broken_pkg.models:VAE")
        assert message == ("module 'usercode_broken_pkg.models' raised while being imported: "
                           "ModuleNotFoundError: No module named 'a_dependency_that_is_not_there'")
        message = error_of(load_object, "usercode_broken_pkg.nothing:VAE")
        assert "no module named 'usercode_broken_pkg.nothing'" in message
        assert "has no attribute 'VAE'" in error_of(load_object, "usercode_broken_pkg:VAE")
    finally:
        for name in [n for n in sys.modules if n.startswith("usercode_broken_pkg")]:
            sys.modules.pop(name)
