# Sourced by examples/gpu_*.sh: what a GPU machine without network access needs before
# ebmm runs there. The wheels under .whl/ (the Python dependencies that machine lacks,
# e.g. piqa) go into a fresh temporary folder; the repository and that folder on the
# path; the data root is .gpu-data/.
site=$(mktemp -d)
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .whl/*.whl
fi
export PYTHONPATH="$PWD:$site" PYTHONUNBUFFERED=1 EBMM_DATA="$PWD/.gpu-data"
