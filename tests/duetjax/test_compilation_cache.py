"""duetjax/compilation_cache.py: the persistent cache, and the count of what it served."""
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_second_compilation_loads_from_the_cache_and_is_counted(tmp_path):
    """In a fresh process (JAX's cache settings are process-wide): the first compilation
    looks in the cache and misses, the same one again after the in-memory caches are cleared
    loads it."""
    script = textwrap.dedent(f"""
        import jax, jax.numpy as jnp
        from duetjax.compilation_cache import cache_counts, enable_compilation_cache
        enable_compilation_cache({str(tmp_path / 'xla')!r})
        f = lambda x: jnp.sin(x) @ x.T + 1
        x = jnp.ones((64, 64))
        counts = [cache_counts()]
        jax.jit(f).lower(x).compile()
        counts.append(cache_counts())
        jax.clear_caches()
        jax.jit(f).lower(x).compile()
        counts.append(cache_counts())
        print([(h - h0, r - r0) for (h, r), (h0, r0) in zip(counts[1:], counts)])
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split("\n")[-2]
    assert out == "[(0, 1), (1, 1)]"  # (hits, lookups): a miss, then a hit
