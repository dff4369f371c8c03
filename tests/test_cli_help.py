"""The ``boxmask`` command line as a manual: --version, help on every option, examples, ``recipes``."""

import argparse
import re
from importlib import metadata

import pytest
import yaml

from boxmask.cli import build_parser, main, parse_cli
from boxmask.config import load_config, packaged_config_names, resolve_config_path
from boxmask.recipes import recipe_description, recipe_info

COMMANDS = {"demo", "recipes", "train", "eval", "predict", "annotate", "export"}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return parser._option_string_actions.get(flag)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"boxmask {metadata.version('boxmask')} ")
    assert f"torch {metadata.version('torch')}" in out


def test_every_command_and_argument_has_help():
    parser = build_parser()
    subs = _subparsers(parser)
    assert set(subs) == COMMANDS
    sub_action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    listed = {a.dest: a.help for a in sub_action._choices_actions}
    missing = []
    for name, sub in [("boxmask", parser), *subs.items()]:
        if name != "boxmask" and not (listed.get(name) or "").strip():
            missing.append(f"{name} (command)")
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS or not action.help.strip():
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"arguments without help: {missing}"


def test_every_command_has_example_commands():
    for name, sub in _subparsers(build_parser()).items():
        examples = re.findall(rf"^ +boxmask {name}\b", sub.epilog or "", flags=re.M)
        assert 2 <= len(examples) <= 4, f"{name}: {len(examples)} example commands in the epilog"
        assert sub.format_help().count(f"boxmask {name}") >= 2


def test_shared_option_names():
    subs = _subparsers(build_parser())
    for name in ("eval", "predict", "annotate", "demo", "train"):
        assert _option(subs[name], "-o") is _option(subs[name], "--output") is not None, name
        assert _option(subs[name], "--device") is not None, name
    for name in ("eval", "annotate"):
        assert _option(subs[name], "--ann-file") and _option(subs[name], "--images"), name
    for name in ("eval", "predict"):
        assert _option(subs[name], "--max-dets"), name
    for name in ("predict", "demo"):
        assert _option(subs[name], "--score-threshold"), name


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_accepts_auto_cpu_cuda(device):
    for command in (["eval", "x.ckpt"], ["predict", "x.ckpt", "img.png"]):
        assert build_parser().parse_args([*command, "--device", device]).device == device


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "mps0"])
def test_device_rejects_others(device, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["eval", "x.ckpt", "--device", device])
    assert exit_.value.code == 2
    assert "auto|cpu|cuda|cuda:N" in capsys.readouterr().err


def test_old_option_spellings_still_parse():
    args = build_parser().parse_args(["eval", "x.ckpt", "--output", "o", "--max-dets", "7"])
    assert args.output == "o" and args.max_dets == 7
    args = build_parser().parse_args(["-v", "predict", "x.ckpt", "a.png", "--output", "p"])
    assert args.output == "p" and args.verbose == 1


def test_overrides_may_follow_an_option(capsys):
    args = parse_cli(build_parser(), ["train", "r.yaml", "a.b=1", "-o", "out", "c.d=2", "e.f=[3]"])
    assert args.output == "out" and args.overrides == ["a.b=1", "c.d=2", "e.f=[3]"]
    args = parse_cli(build_parser(), ["eval", "x.ckpt", "--max-dets", "7", "model.mask_largest_component=true"])
    assert args.max_dets == 7 and args.overrides == ["model.mask_largest_component=true"]
    with pytest.raises(SystemExit):  # not an override: still an error
        parse_cli(build_parser(), ["train", "r.yaml", "-o", "out", "stray"])
    assert "unrecognized arguments: stray" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "COMMAND" in out and "boxmask train" in out


def test_recipes_lists_every_packaged_recipe(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = packaged_config_names()
    assert len(names) >= 10
    for name in names:
        info = recipe_info(name)
        row = next((i for i, line in enumerate(lines) if line.split()[:1] == [name]), None)
        assert row is not None, f"{name} not listed"
        assert lines[row].split()[1:4] == [info.method, info.backbone, info.dataset.split()[0]]
        assert info.description and lines[row + 1].strip() == info.description
        assert info.description == recipe_description(resolve_config_path(name))


def test_recipe_summaries_come_from_the_files():
    coco = recipe_info("boxinst_R_50_FPN_1x")
    assert (coco.method, coco.backbone, coco.dataset) == ("boxinst", "resnet50", "coco")
    nuts = recipe_info("boxlevelset_effnet-lite0_fpn_nuts")
    assert (nuts.method, nuts.arch, nuts.backbone, nuts.dataset) == ("boxlevelset", "solov2", "efficientnet_lite0", "nuts")
    assert recipe_info("boxinst_effnet-lite0_fpn_dsb2018-sample").dataset.startswith("dsb2018-sample")
    for name in packaged_config_names():  # the first line is a whole summary, not the start of a paragraph
        assert recipe_info(name).description.endswith((".", ")")), name


def test_recipe_description_is_the_first_comment_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("\n# My recipe: nuts at 512 px.\n# details\nsupervision:\n  type: boxinst\n")
    assert recipe_description(path) == "My recipe: nuts at 512 px."
    path.write_text("supervision:  # not a header\n  type: boxinst\n")
    assert recipe_description(path) == ""


def test_recipes_name_prints_the_resolved_recipe(capsys, tmp_path):
    name = "sim_effnet-lite0_fpn_nuts"
    assert main(["recipes", name, "solver.max_iters=7"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"# {resolve_config_path(name).resolve()}\n")
    resolved = yaml.safe_load(text)
    assert resolved == load_config(name, ["solver.max_iters=7"]).to_dict()
    assert resolved["solver"]["max_iters"] == 7 and resolved["supervision"]["type"] == "sim"
    copy = tmp_path / "copy.yaml"  # the printed text is itself a recipe
    copy.write_text(text)
    assert load_config(copy).to_dict() == resolved


def test_template_recipe_is_listed_and_printed(tmp_path, capsys):
    """A recipe whose data paths are filled in later (e.g. by a tool) still has a summary and a resolved view."""
    path = tmp_path / "template.yaml"
    path.write_text("# Template: data given at run time.\nsupervision:\n  type: boxinst\ndata:\n  train_json: ''\n")
    info = recipe_info(path)
    assert (info.method, info.dataset, info.description) == ("boxinst", "-", "Template: data given at run time.")
    assert main(["recipes", str(path)]) == 0
    text = capsys.readouterr().out
    assert "# not trainable as it is: data.train_json is empty" in text
    assert yaml.safe_load(text)["data"]["train_json"] == ""


def test_recipes_unknown_name_is_a_clear_error(capsys):
    assert main(["recipes", "no_such_recipe"]) == 2
    err = capsys.readouterr().err
    assert "no_such_recipe" in err and "boxinst_R_50_FPN_1x" in err
