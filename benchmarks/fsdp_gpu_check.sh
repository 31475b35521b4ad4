# GPU check of the scale-out switches (about 5 minutes on one H200; everything lands under $OUT):
# 1. benchmarks/gpu_checks/fsdp_gpu_check.py: d30 256 px and d36 512 px on one GPU, plain and FSDP2, with and without activation
#    checkpointing: peak memory, img/s, the largest per-GPU batch -> $OUT/fsdp_gpu_check.json
# 2. a short train.py run under FSDP with compile, FlexAttention and activation checkpointing (a d8 on synthetic
#    images and a random-weight tokenizer), resumed for one more epoch, exported and loaded -> $OUT/train_fsdp*.log
#    and $OUT/train_fsdp_compile.json (per-step losses)
set -u
OUT=${OUT:-/tmp/fsdp_gpu_check}  # where the results go, unless OUT is set
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

python3 -m benchmarks.gpu_checks.fsdp_gpu_check --out "$OUT/fsdp_gpu_check.json" --budget_s 150 > "$OUT/memory_speed.log" 2>&1
echo "== memory/speed rc=$?"; tail -12 "$OUT/memory_speed.log"

python3 -m benchmarks.gpu_checks.synthetic_data --out /tmp/fsdp_data --train 128 --val 16 --size 288x288 --quality 75 \
  --vae /tmp/fsdp_vae.pth
FLAGS="--depth=8 --bs=32 --fp16=2 --alng=1e-3 --wpe=0.1 --data_path=/tmp/fsdp_data --vae_ckpt=/tmp/fsdp_vae.pth --workers=4 --seed=0 --log_steps=1 --ckpt_every_iters=2 --local_out_dir_path=/tmp/out_fsdp --fsdp=1 --act_ckpt=1 --flex=1"
torchrun --nproc_per_node=1 train.py $FLAGS --tfast=3 --ep=1 > "$OUT/train_fsdp.log" 2>&1
echo "== fsdp + compile + flex + act_ckpt, ep1 rc=$?"; grep -E "speed|error|Traceback" "$OUT/train_fsdp.log" | tail -4
torchrun --nproc_per_node=1 train.py $FLAGS --ep=2 > "$OUT/train_fsdp_resume.log" 2>&1  # resumed without compile
echo "== fsdp resumed to ep2 rc=$?"; grep -E "auto-resume|speed|error|Traceback" "$OUT/train_fsdp_resume.log" | tail -4
python3 -m utils.export_ckpt /tmp/out_fsdp --out /tmp/fsdp_export.pth > "$OUT/export.log" 2>&1
echo "== export rc=$?"
python3 - "$OUT" <<'PY'
import json, sys
import models
steps = [json.loads(line) for line in open('/tmp/out_fsdp/steps.jsonl')]
vae, var = models.load_checkpoint_models('/tmp/fsdp_export.pth', device='cuda')
res = {'losses': {s['g_it']: s['loss'] for s in steps}, 'export_params': sum(p.numel() for p in var.parameters())}
json.dump(res, open(f'{sys.argv[1]}/train_fsdp_compile.json', 'w'), indent=1)
print(res)
PY
