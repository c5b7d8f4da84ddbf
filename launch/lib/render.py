"""Fills ${NAME} placeholders in a manifest template; needs only the standard library.

  python3 render.py TEMPLATE NAME=VALUE ... [-- WORD ...]

${NAME} becomes VALUE verbatim; when the placeholder is alone on its line, every
line of a multi-line VALUE is indented to the placeholder's column (for YAML block
scalars). ${NAME|json} becomes VALUE as a JSON string (valid YAML). ${ARGS} becomes
the WORDs after `--` as a JSON list. Only upper-case names are placeholders, so
shell snippets inside a template may use lower-case ${name}. A placeholder with no
value is an error, so a typo cannot render silently.
"""

import json
import re
import sys

_PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)(\|json)?\}")


def render(template: str, values: dict) -> str:
    missing = sorted({m.group(1) for m in _PLACEHOLDER.finditer(template)} - set(values))
    if missing:
        raise ValueError(f"no value for {', '.join(missing)}")
    lines = []
    for line in template.splitlines(keepends=True):
        alone = re.fullmatch(r"(\s*)\$\{([A-Z][A-Z0-9_]*)\}(\s*)", line)
        if alone:
            indent, name, end = alone.groups()
            value = values[name].splitlines() or [""]
            lines.append("".join(f"{indent}{v}\n" if v else "\n" for v in value))
            continue

        def fill(match):
            value = values[match.group(1)]
            return json.dumps(value) if match.group(2) else value

        lines.append(_PLACEHOLDER.sub(fill, line))
    return "".join(lines)


def main(argv):
    if len(argv) < 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    path, rest = argv[1], argv[2:]
    words = []
    if "--" in rest:
        words = rest[rest.index("--") + 1 :]
        rest = rest[: rest.index("--")]
    values = {"ARGS": json.dumps(words)}
    for item in rest:
        name, sep, value = item.partition("=")
        if not sep:
            print(f"render.py: error: {item!r} is not NAME=VALUE", file=sys.stderr)
            return 2
        values[name] = value
    try:
        with open(path, encoding="utf-8") as file:
            sys.stdout.write(render(file.read(), values))
    except (OSError, ValueError) as error:
        print(f"render.py: error: {path}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
