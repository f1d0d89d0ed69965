"""The layout rules of README's "Layout" section, checked on the code itself:

- stages (the modules `python -m pipeline.<stage>` runs) are leaves: no stage imports another,
  and no module of `pipeline/` imports a stage; there is no import cycle in `pipeline/`;
- each stage's code deps in dvc.yaml are exactly the in-repo code it runs: its import closure,
  plus `pipeline/jpegcrop.c` where it decodes;
- param deps name every key that changes a result, and none of `params.EXECUTION_KEYS`.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import yaml

from pipeline import params as params_module
from tests.conftest import REPO

PACKAGES = ("pipeline", "resnet")
C_EXTENSIONS = {"jpegcrop": "pipeline/jpegcrop.c"}  # setup.py builds the module from this source


def module_file(module: str) -> str | None:
    """The repo file of a dotted module name, or None when it is not ours."""
    if module in C_EXTENSIONS:
        return C_EXTENSIONS[module]
    if module.split(".")[0] not in PACKAGES:
        return None
    path = Path(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if (REPO / candidate).is_file():
            return candidate.as_posix()
    return None


def package_of(file: str) -> str:
    parts = Path(file).with_suffix("").parts
    return ".".join(parts[:-1])  # resnet/model.py and resnet/__init__.py are both in resnet


@cache
def imports_of(file: str) -> frozenset[str]:
    """The repo files `file` imports anywhere in it (functions too: a lazy import runs as well)."""
    if not file.endswith(".py"):
        return frozenset()
    found = set()
    for node in ast.walk(ast.parse((REPO / file).read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package
                package = package_of(file).split(".")
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            # `from pipeline import loader` names a module; `from pipeline.loader import x` a name in one
            names = [f"{base}.{alias.name}" for alias in node.names if module_file(f"{base}.{alias.name}")]
            names = names or [base]
        else:
            continue
        found |= {f for f in map(module_file, names) if f and f != file}
    return frozenset(found)


def closure(file: str) -> set[str]:
    seen, todo = set(), [file]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += imports_of(current)
    return seen


def stage_modules() -> dict[str, str]:
    """stage name -> its file: every module `python -m` runs (it has a `__main__` block)."""
    return {
        path.stem: path.relative_to(REPO).as_posix()
        for path in sorted((REPO / "pipeline").glob("*.py"))
        if 'if __name__ == "__main__":' in path.read_text()
    }


def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_the_stages_are_the_verbs():
    assert set(stage_modules()) == {"shard", "verify", "tune", "evaluate", "register", "report", "train"}


def test_no_module_imports_a_stage():
    stages = set(stage_modules().values())
    offenders = {
        f"{path.relative_to(REPO)} imports {imported}"
        for path in (REPO / "pipeline").glob("*.py")
        for imported in imports_of(path.relative_to(REPO).as_posix())
        if imported in stages
    }
    assert not offenders


def test_no_import_cycle_in_pipeline():
    files = [p.relative_to(REPO).as_posix() for p in (REPO / "pipeline").glob("*.py")]
    for file in files:
        for imported in imports_of(file):
            assert file not in closure(imported), f"{file} -> {imported} -> ... -> {file}"


def test_the_walk_sees_lazy_relative_and_c_imports():
    """The walk sees every form of import the code uses: otherwise the tests above pass on
    imports they never saw."""
    assert "pipeline/sources.py" in imports_of("pipeline/report.py")  # a lazy import in a function
    assert "pipeline/jpegcrop.c" in imports_of("pipeline/transforms.py")
    assert "resnet/model.py" in closure("pipeline/checkpoints.py")  # `import resnet`, then resnet's own relative imports


def code_deps(stage: dict) -> set[str]:
    return {d for d in stage.get("deps", []) if d.endswith((".py", ".c"))}


def test_each_stage_depends_on_exactly_the_code_it_runs():
    stages = dvc_stages()
    for name, file in stage_modules().items():
        if name == "train":  # a command of its own, not a stage of the DAG
            assert name not in stages
            continue
        expected = {f for f in closure(file) if not f.endswith("__init__.py") or f.startswith("resnet/")}
        assert code_deps(stages[name]) == expected, (
            f"dvc.yaml stage {name}: missing {sorted(expected - code_deps(stages[name]))}, "
            f"not run {sorted(code_deps(stages[name]) - expected)}"
        )


def param_keys(stage: dict) -> set[str]:
    keys = set()
    for entry in stage.get("params", []):
        keys |= set(entry) if isinstance(entry, dict) else {entry}
    return keys


def test_param_deps_are_what_changes_a_result():
    stages = dvc_stages()
    sections = params_module.Params.model_fields
    for stage, section in (("tune", "train"), ("tune", "tune"), ("shard", "shard")):
        fields = set(sections[section].annotation.model_fields)
        listed = {k.split(".", 1)[1] for k in param_keys(stages[stage]) if k.startswith(f"{section}.")}
        assert section not in param_keys(stages[stage]), f"{stage}: the whole {section} section is a dep"
        assert listed == fields - set(params_module.EXECUTION_KEYS[section]), stage


# What pipeline/ may call of MLflow outside tracking.py: calls that ask no store. Everything
# else goes through tracking.Store, which retries what a store that races or goes away makes fail.
MLFLOW_CALLS_WITHOUT_A_STORE = {
    "mlflow.set_tracking_uri",  # a setting of this process
    "mlflow.models.set_model",  # declares serving.py's model (models from code)
    "infer_signature",  # a model's signature, from its example
}


def dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := dotted(node.value)):
        return f"{base}.{node.attr}"
    return None


def mlflow_calls_outside_the_store(source: str) -> list[str]:
    """The calls of `source` that would reach an MLflow store without tracking.Store: a client
    made or named (MlflowClient), or a call of an MLflow function (`mlflow.x(...)`, or a name
    imported from mlflow) that is not MLFLOW_CALLS_WITHOUT_A_STORE. Passing one to Store.call is
    not calling it."""
    tree = ast.parse(source)
    from_mlflow = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mlflow"
        for alias in node.names
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.alias) and node.name == "MlflowClient":
            found.append("MlflowClient imported")
        if not (isinstance(node, ast.Call) and (name := dotted(node.func))):
            continue
        root = name.split(".")[0]
        a_class = root in from_mlflow and name[0].isupper()  # an exception or an entity, made here
        if (root == "mlflow" or root in from_mlflow) and not a_class and name not in MLFLOW_CALLS_WITHOUT_A_STORE:
            found.append(f"line {node.lineno}: {name}(...)")
    return found


def test_every_mlflow_call_goes_through_the_retrying_store():
    offenders = {
        path.relative_to(REPO).as_posix(): calls
        for path in sorted((REPO / "pipeline").glob("*.py"))
        if path.name != "tracking.py" and (calls := mlflow_calls_outside_the_store(path.read_text()))
    }
    assert not offenders


def test_the_mlflow_call_check_sees_a_direct_call():
    """It finds what it is for: otherwise the test above passes on calls it never saw."""
    assert mlflow_calls_outside_the_store("import mlflow\nmlflow.log_metric('a', 1)\n") == ["line 2: mlflow.log_metric(...)"]
    assert mlflow_calls_outside_the_store("from mlflow import MlflowClient\nMlflowClient().get_run('x')\n") == [
        "MlflowClient imported"
    ]
    assert mlflow_calls_outside_the_store("import mlflow\nmlflow.MlflowClient('uri')\n") == ["line 2: mlflow.MlflowClient(...)"]
    assert mlflow_calls_outside_the_store("from mlflow.tracking import fluent\nfluent.start_run()\n")
    assert mlflow_calls_outside_the_store("import mlflow\nwith mlflow.start_run(run_id='x'):\n    pass\n")
    assert not mlflow_calls_outside_the_store("import mlflow\nstore.call(mlflow.register_model, 'uri', 'name')\n")


def test_editing_the_model_reshards_nothing_and_editing_serving_retrains_nothing():
    """Two arrows that cost reruns: params (which every stage reads) does not import resnet, and
    the training worker does not import the served model's code (train logs it after `fit`)."""
    modules = stage_modules()
    for stage in ("shard", "verify"):
        assert not {f for f in closure(modules[stage]) if f.startswith("resnet/")}, stage
    assert "pipeline/serving.py" not in closure(modules["tune"])
    assert "pipeline/serving.py" not in closure("pipeline/worker.py")
