"""The architecture, checked: dependencies point one way (imports inside functions count), the top
of mgie_jax holds only commands, no two modules share a name, no private name crosses a package,
configs are plain data, and the library imports inside functions only what it defers on purpose."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("mgie_jax", "data_pipelines", "configs")
COMMANDS = {"train", "evaluate", "edit", "export", "compile", "demo"}
# Optional or heavy dependencies the library imports where they are used, not at the top:
# torch (the [torch] extra: .bin/.pt files), the PyTorch-side pipeline's transformers/diffusers,
# and matplotlib (plots only).
DEFERRED = ("torch", "transformers", "diffusers", "matplotlib")


def modules() -> dict:
  """{dotted module name: path} of every module of the three packages."""
  out = {}
  for pkg in PACKAGES:
    for dirpath, _, names in os.walk(os.path.join(ROOT, pkg)):
      for n in names:
        if n.endswith(".py"):
          rel = os.path.relpath(os.path.join(dirpath, n), ROOT)[:-3].replace(os.sep, ".")
          out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, n)
  return out


MODULES = modules()


def imported(node) -> list[str]:
  """The modules an import statement loads (`from pkg import sub` loads pkg.sub when it is one)."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names]
  if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
    return [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names]
  return []


def ours(name: str) -> str | None:
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def graph() -> dict:
  """{module: the modules of ours it imports, at the top or inside functions}."""
  g = {}
  for mod, path in MODULES.items():
    deps = set()
    for node in ast.walk(ast.parse(open(path).read())):
      deps |= {ours(n) for n in imported(node)} - {None, mod}
    g[mod] = deps
  return g


GRAPH = graph()


def deps_of(prefix: str):
  for mod, deps in GRAPH.items():
    if mod == prefix or mod.startswith(prefix + "."):
      for d in deps:
        yield mod, d


def test_no_import_cycle():
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for d in sorted(GRAPH[m]):
      if state.get(d) == "open":
        pytest.fail("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
      if d not in state:
        visit(d)
    stack.pop()
    state[m] = "done"

  for m in sorted(GRAPH):
    if m not in state:
      visit(m)


@pytest.mark.parametrize("layer, forbidden", [
    # a model file knows nothing of files, training or data
    ("mgie_jax.models", ("mgie_jax.convert", "mgie_jax.training", "mgie_jax.run", "mgie_jax.inference",
                         "mgie_jax.evaluation", "data_pipelines")),
    ("mgie_jax.core", ("mgie_jax.models", "mgie_jax.convert", "mgie_jax.run", "mgie_jax.training",
                       "mgie_jax.inference", "mgie_jax.evaluation", "data_pipelines")),
    ("mgie_jax.convert", ("mgie_jax.run", "mgie_jax.training", "mgie_jax.inference", "mgie_jax.evaluation",
                          "data_pipelines")),
    ("mgie_jax.run", ("mgie_jax.training", "mgie_jax.inference", "mgie_jax.evaluation", "data_pipelines")),
    ("mgie_jax.inference", ("mgie_jax.training", "mgie_jax.evaluation", "data_pipelines")),
    ("data_pipelines", ("mgie_jax.training", "mgie_jax.evaluation")),
    ("configs", ("mgie_jax", "data_pipelines")),       # plain data
])
def test_dependencies_point_one_way(layer, forbidden):
  for mod, dep in deps_of(layer):
    assert not dep.startswith(forbidden), f"{mod} imports {dep}"


def test_nothing_imports_a_command():
  commands = {f"mgie_jax.{c}" for c in COMMANDS}
  for mod, deps in GRAPH.items():
    assert not deps & commands, (mod, deps & commands)


def test_the_top_of_mgie_jax_holds_only_commands():
  top = {n[:-3] for n in os.listdir(os.path.join(ROOT, "mgie_jax")) if n.endswith(".py")} - {"__init__"}
  assert top == COMMANDS
  for c in COMMANDS:
    assert 'if __name__ == "__main__":' in open(os.path.join(ROOT, "mgie_jax", f"{c}.py")).read(), c


def test_no_two_modules_share_a_name():
  seen = {}
  for mod in MODULES:
    leaf = mod.rpartition(".")[2]
    if mod.startswith("configs") or os.path.basename(MODULES[mod]) == "__init__.py":
      continue          # configs are data files, named by the recipe
    # a TFDS builder lives in <name>/<name>.py by TFDS's convention
    if mod.split(".")[-2:-1] == [leaf]:
      continue
    assert leaf not in seen, f"{mod} and {seen[leaf]}"
    seen[leaf] = mod


def test_no_private_name_crosses_a_package():
  for mod, path in MODULES.items():
    here = mod if os.path.basename(path) == "__init__.py" else mod.rpartition(".")[0]
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.ImportFrom) and node.module and ours(node.module):
        src = ours(node.module)
        package = src if os.path.basename(MODULES[src]) == "__init__.py" else src.rpartition(".")[0]
        for a in node.names:
          assert not a.name.startswith("_") or package == here, f"{mod} imports {node.module}.{a.name}"


def test_the_library_imports_inside_functions_only_what_it_defers():
  for mod, path in MODULES.items():
    if mod in {f"mgie_jax.{c}" for c in COMMANDS} or not mod.startswith("mgie_jax"):
      continue        # commands defer the JAX stack until their flags are checked (said in each)
    tree = ast.parse(open(path).read())
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
        for name in imported(node):
          assert name.split(".")[0] in DEFERRED, f"{mod}:{node.lineno} imports {name} inside a function"
