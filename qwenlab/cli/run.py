"""`qwenlab run [RECIPE.yaml]`: the recipe runner (no argument: the built-in nano recipe)."""


def cmd_run(args) -> int:
    from qwenlab.recipe import run_recipe

    run_recipe(args.recipe, args.out)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="run a recipe (default: the built-in nano recipe)")
    p.add_argument("recipe", nargs="?", default=None, help="a recipe YAML file")
    p.add_argument("--out", default=None, help="run folder (default ./qwenlab-runs/<timestamp>)")
    p.set_defaults(func=cmd_run)
