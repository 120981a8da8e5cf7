#!/bin/bash
# Run from the repo root there with .devcarry carried (benchmarks/device/prepare.sh builds it). JOBS: one line per
# training, "NAME ARGS" for benchmarks/recovery.py ($MM / $CC: the MiniLM / cls model and data); MINILM=1 unpacks
# MiniLM, CLS_TRAIN=N renders N cls training lines (CLS_EVAL held-out, default 2000); RUN_LIMIT: seconds per training.
# device: install the edge_sparse wheel, lay out data, run the trainings named in $JOBS concurrently (logs in $OUT)
export PYTHONUNBUFFERED=1 TVM_BIND_THREADS=0
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devcarry/common/*.whl || exit 1
export PYTHONPATH=/tmp/site EDGE_SPARSE_CACHE=$PWD/.devcarry/cache
M=/tmp/m; mkdir -p $M
if [ -n "$MINILM" ]; then cp .devcarry/minilm/*.npz $M/
gunzip -c .devcarry/minilm/data.json.gz > $M/all-MiniLM-L6-v2-seq128.data.json
python3 benchmarks/device/fp16.py unpack .devcarry/minilm/model16.onnx $M/all-MiniLM-L6-v2-seq128.onnx; fi
MM="--model minilm-l6 --model-file $M/all-MiniLM-L6-v2-seq128.onnx --data-dir $M --device cuda"
if [ -n "$CLS_TRAIN" ]; then
  C=/tmp/c; mkdir -p $C
  /tmp/site/bin/edge-sparse models get ppocr-cls -o $C --calib 256 --eval ${CLS_EVAL:-2000} -q
  python3 benchmarks/device/render_train.py ppocr-cls $C $CLS_TRAIN 14
fi
CC="--model ppocr-cls --model-file /tmp/c/ch_ppocr_mobile_v2.0_cls_infer.onnx --data-dir /tmp/c --device cuda"
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
i=0
while IFS= read -r line; do
  [ -z "$line" ] && continue
  i=$((i+1)); name=$(echo "$line" | cut -d' ' -f1); args=$(echo "$line" | cut -d' ' -f2-)
  eval "timeout ${RUN_LIMIT:-540} python3 benchmarks/recovery.py $args --out \$OUT/$name.json" > $OUT/$name.log 2>&1 &
done <<< "$JOBS"
wait
for f in $OUT/*.log; do echo "== $f"; tail -n 4 $f; done
