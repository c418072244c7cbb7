"""Line counts of the product and the lab at a git revision, per package: all lines of the .py
files, and code lines (lines holding a token that is neither a comment nor a docstring).

    python docs/bench/line_counts.py f775ddb      # from the repository root; default: HEAD
"""
import io
import subprocess
import sys
import tokenize

PACKAGES = ('ffcv_pipeline', 'model', 'training', 'app', 'scripts', 'bench')
LAYOUT = {tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}


def code_lines(src: str) -> int:
    lines, statement_start = set(), True
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL) or tok.type in LAYOUT:
            statement_start = statement_start or tok.type in LAYOUT
            continue
        if not (tok.type == tokenize.STRING and statement_start):  # a docstring is a statement of one string
            lines.update(range(tok.start[0], tok.end[0] + 1))
        statement_start = False
    return len(lines)


def main(rev: str) -> None:
    files = subprocess.run(['git', 'ls-tree', '-r', '--name-only', rev, '--', *PACKAGES],
                           capture_output=True, text=True, check=True).stdout.split()
    totals: dict[str, list[int]] = {}
    for f in (f for f in files if f.endswith('.py')):
        src = subprocess.run(['git', 'show', f'{rev}:{f}'], capture_output=True, text=True, check=True).stdout
        t = totals.setdefault(f.split('/')[0], [0, 0])
        t[0] += len(src.splitlines())
        t[1] += code_lines(src)
    for pkg, (n, c) in sorted(totals.items()):
        print(f'{pkg:14} lines {n:6} code {c:6}')
    print(f'{"all":14} lines {sum(v[0] for v in totals.values()):6} code {sum(v[1] for v in totals.values()):6}')


if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else 'HEAD')
