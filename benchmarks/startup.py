"""Start-up cost of the agent: `python -c "import agent"` against `python -c pass`.

Median of 20 alternating runs each. Target: at most +15 ms.
"""

from __future__ import annotations

from _util import agent_env, compile_bytecode, python, time_commands

TARGET_MS = 15.0


def main() -> None:
    compile_bytecode()
    py = python()
    results = time_commands(
        {
            "python -c pass": [py, "-c", "pass"],
            'python -c "import agent"': [py, "-c", "import agent"],
        },
        agent_env(),
    )
    base = results["python -c pass"]
    print(f"{'command':<32} {'median ms':>10} {'added ms':>9}")
    for name, ms in results.items():
        print(f"{name:<32} {ms:>10.1f} {ms - base:>+9.1f}")
    added = results['python -c "import agent"'] - base
    verdict = "ok" if added <= TARGET_MS else "OVER TARGET"
    print(f"import agent adds {added:.1f} ms (target <= {TARGET_MS:.0f} ms): {verdict}")


if __name__ == "__main__":
    main()
