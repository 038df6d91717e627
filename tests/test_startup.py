import subprocess
import sys


def test_sizing_an_enterprise_preset_never_imports_torch():
    """`sapwood size` is pure arithmetic: no torch import, no weight allocation."""
    code = (
        "import sys, json, io, contextlib\n"
        "from sapwood.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    try:\n"
        "        main(['size', 'enterprise-400b', '--json'])\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code in (0, None), exc.code\n"
        "assert json.loads(buf.getvalue())['params_total'] == 463231270912\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "False"
