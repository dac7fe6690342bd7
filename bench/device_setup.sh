# Source on the device machine (H100): installs the carried wheels (.whl: optuna and its deps,
# flash-linear-attention 0.6.0) into /tmp/site, and momtune itself in editable mode (so the
# checkout's reference/ and kernels/ map to momtune.reference / momtune.kernels as locally).
set -e
rm -rf /tmp/site/momtune* /tmp/site/__editable__*momtune*
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | grep -v "already exists" || true
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1
export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1
python3 -c "import momtune, momtune.kernels, torch, triton, optuna, fla; print('momtune', momtune.__version__, momtune.kernels.__file__, 'torch', torch.__version__, 'triton', triton.__version__, 'optuna', optuna.__version__, 'fla ok', torch.cuda.get_device_name())"
set +e
