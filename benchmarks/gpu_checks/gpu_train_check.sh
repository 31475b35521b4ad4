# GPU check of train.py: a short d16 run at 256 px with bf16 and fp16 on a random-weight tokenizer + synthetic photo-like
# data, then the same bf16 run from a pre-tokenised set (pretokenize.py + --pretok; fixed crops, no encoder in the step).
set -u
OUT=${OUT:-/tmp/gpu_train_check}  # where the logs go, unless OUT is set
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m benchmarks.gpu_checks.synthetic_data --out /tmp/data --train 1024 --val 64 --size 300x280 --vae /tmp/vae.pth
for fp in 2 1; do
  python3 train.py --depth=16 --bs=64 --ep=1 --fp16=$fp --alng=1e-3 --wpe=0.1 --data_path=/tmp/data --vae_ckpt=/tmp/vae.pth \
    --local_out_dir_path=/tmp/out_fp$fp --workers=8 --val_every_ep=1 --seed=0 > $OUT/train_fp$fp.log 2>&1
  echo "== fp16=$fp rc=$?"; grep -iE "img/s|images/s|peak|ep ?1|Lm|error" $OUT/train_fp$fp.log | tail -6
done
python3 pretokenize.py --data_path=/tmp/data --out=/tmp/tokens --vae_ckpt=/tmp/vae.pth --workers=8 > $OUT/pretok.log 2>&1
echo "== pretokenize rc=$?"; grep -E "pretokenize|done" $OUT/pretok.log | tail -4
python3 train.py --depth=16 --bs=64 --ep=1 --fp16=2 --alng=1e-3 --wpe=0.1 --pretok=/tmp/tokens --vae_ckpt=/tmp/vae.pth \
  --local_out_dir_path=/tmp/out_pretok --workers=2 --val_every_ep=1 --seed=0 > $OUT/train_pretok.log 2>&1
echo "== pretok fp16=2 rc=$?"; grep -iE "img/s|images/s|peak|ep ?1|Lm|error" $OUT/train_pretok.log | tail -6
