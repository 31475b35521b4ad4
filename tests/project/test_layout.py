"""The layout's walls, read from the sources: the models package stands on torch alone (no project module outside
it), the model does not stand on its sampling engine (the engine imports the model, never the reverse), and no
function of the library below the scripts takes the scripts' parsed command line as its sampling settings."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = {p.name for p in ROOT.iterdir() if (p / '__init__.py').is_file()} | {
    p.stem for p in ROOT.glob('*.py')}


def project_imports(path: pathlib.Path):
    """The project modules a file imports (absolute names; relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = '.'.join(path.relative_to(ROOT).parent.parts)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parent = package.split('.')[:len(package.split('.')) - node.level + 1]
                base = '.'.join(parent + ([base] if base else []))
            names = [f'{base}.{a.name}' if base else a.name for a in node.names]
        else:
            continue
        yield from (n for n in names if n.split('.')[0] in PROJECT_PACKAGES)


def test_models_import_nothing_of_the_project_outside_models():
    for path in sorted((ROOT / 'models').glob('*.py')):
        outside = [n for n in project_imports(path) if not n.startswith('models')]
        assert not outside, f'{path.name} imports {outside}: the models package must stand on torch alone'


def test_the_model_does_not_import_its_engine():
    engine_side = ('models.engine', 'models.cuda_graphs', 'models.lowp')
    for name in ('var.py', 'basic_var.py', 'helpers.py', 'quant.py', 'vqvae.py'):
        imported = list(project_imports(ROOT / 'models' / name))
        assert not [n for n in imported if n.startswith(engine_side)], (name, imported)
    assert any(n.startswith('models.var') for n in project_imports(ROOT / 'models' / 'engine.py'))


def test_no_library_function_takes_a_namespace():
    """sampling/ (but its command-line modules), webapp/, demo/ and models/: no parameter annotated or named as an
    argparse.Namespace; sampling settings are `sampling.settings.SamplingSettings`."""
    command_line = {'cli.py', 'model_flags.py'}  # the scripts' shared flags and exit codes, read by the scripts only
    for folder in ('sampling', 'webapp', 'demo', 'models'):
        for path in sorted((ROOT / folder).glob('*.py')):
            if folder == 'sampling' and path.name in command_line:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    for arg in node.args.args + node.args.kwonlyargs:
                        text = ast.unparse(arg.annotation) if arg.annotation is not None else ''
                        assert 'Namespace' not in text, f'{path.relative_to(ROOT)}:{node.lineno} {node.name}({arg.arg})'
