#!/usr/bin/env bash
# Issue 9's listed cases run through the CLI on a small demo, one line each: exit status, whether a
# traceback was printed, whether any file under data/ or runs/ changed, and the first error line.
# usage: bash benchmarks/integrity_cases.sh .venv/bin /tmp/cases   (WORKDIR is deleted first; ~3 min)
# To see an older version's behaviour: PYTHONPATH=<its checkout> bash benchmarks/integrity_cases.sh ...
set -u
BIN=$1; W=$2
rm -rf "$W"; mkdir -p "$W"; cd "$W"
export REGINA_DATA=$W/data OMP_NUM_THREADS=1
R="$BIN/regina"
TINY=(--set model.d_model=16 --set model.n_layers=1 --set model.n_heads=2 --set model.z_dim=16 --set model.ff_mult=2
      --set model.classifier_hidden=16 --set model.transition_hidden=32 --set "model.discriminator_hidden=[32,16]"
      --set ae.batch_size=64 --set gan.batch_size=64)
q() { "$@" >/dev/null 2>&1 || { echo "setup failed: $*"; "$@"; exit 1; }; }
q $R fetch demo --cells 800 --genes 150 --singles 10 --doubles 8
q $R split demo --seed 1
q $R split demo --seed 2
q $R label demo --method stress --split simulation_1
q $R train-ae demo --split simulation_1 --labels stress --run runs/r --device cpu --max-epochs 2 "${TINY[@]}"
q $R train-gan --run runs/r --device cpu --max-epochs 1
q $R predict --run runs/r --device cpu --cells 20
q $R evaluate demo --predictions runs/r/predictions.h5ad --device cpu --no-plots
cp -r runs/r runs/pristine; cp -r data data_pristine
snap() { (cd "$W" && find data runs -type f ! -name '*.part*' -print0 2>/dev/null | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-12); }
restore() { rm -rf runs/r data; cp -r runs/pristine runs/r; cp -r data_pristine data; }
case_() {  # name, command...
  local name=$1; shift
  local before; before=$(snap)
  "$@" >out.txt 2>&1; local rc=$?
  local after; after=$(snap)
  local tb=no; grep -q Traceback out.txt && tb=yes
  local changed=no; [[ $before != "$after" ]] && changed=yes
  local err; err=$(grep -m1 -iE '^(error|warning)|Error:|warning:' out.txt | cut -c1-150)
  printf '%-34s rc=%-3s tb=%-3s changed=%-3s %s\n' "$name" "$rc" "$tb" "$changed" "$err"
  restore
}
case_ "1 resume d_model=64" $R train-ae demo --split simulation_1 --labels stress --run runs/r --resume --set model.d_model=64 --device cpu
case_ "2 split at frac 0.5 (its own name)" $R split demo --seed 1 --train-gene-frac 0.5
# the run's split replaced with other content: runs made from it are stale (a version before splits were named
# by their share replaced simulation_1 itself with --force)
if $R split demo --seed 1 --train-gene-frac 0.5 >/dev/null 2>&1 && [[ -f data/demo/splits/simulation_1_0.5.json ]]; then
  cp data/demo/splits/simulation_1_0.5.json data/demo/splits/simulation_1.json
else
  $R split demo --seed 1 --train-gene-frac 0.5 --force >/dev/null 2>&1
fi
printf '%-34s rc=%s\n' "2 .. then predict (stale)" "$($R predict --run runs/r --device cpu --cells 5 >out.txt 2>&1; echo $?) $(grep -m1 -i error out.txt | cut -c1-120)"
printf '%-34s rc=%s\n' "2 .. then evaluate (stale)" "$($R evaluate demo --predictions runs/r/predictions.h5ad --device cpu --no-plots >out.txt 2>&1; echo $?) $(grep -m1 -i error out.txt | cut -c1-120)"
restore
python3 - <<'EOF'
import json
s = json.load(open("data/demo/splits/simulation_1.json"))
json.dump({k: s[k] for k in ("train", "val", "test")}, open("custom_a.json", "w"))
t = json.load(open("data/demo/splits/simulation_2.json"))
json.dump({k: t[k] for k in ("train", "val", "test")}, open("custom_b.json", "w"))
EOF
$R split demo --split-file custom_a.json >/dev/null 2>&1
a_files=$(cd data/demo/splits && ls custom_* | tr '\n' ' '); a_hash=$(cat data/demo/splits/custom_* | sha256sum | cut -c1-12)
$R split demo --split-file custom_b.json >out.txt 2>&1; rc=$?
a_after=$(cat $(for f in $a_files; do echo data/demo/splits/$f; done) | sha256sum | cut -c1-12)
printf '%-34s rc=%s first=%s then=%s; first file(s) %s\n' "2 --split-file other content" "$rc" "$a_files" "$(cd data/demo/splits && ls custom_* | tr '\n' ' ')" "$([[ $a_hash == "$a_after" ]] && echo unchanged || echo OVERWRITTEN)"
restore
case_ "3 label --split simulation_2" $R label demo --method stress --split simulation_2
$R label demo --method stress --split simulation_2 >/dev/null 2>&1; echo "   labels after: $(ls data/demo/labels | tr '\n' ' ')"
rc3=$($R train-ae demo --split simulation_1 --labels stress --run runs/l --device cpu --max-epochs 1 "${TINY[@]}" >out.txt 2>&1; echo $?)
printf '%-34s rc=%s labels used were fitted on: %s\n' "3 .. then train-ae --split simulation_1" "$rc3" "$($BIN/python -c "
import json, os
f = 'data/demo/labels/stress@simulation_1.json' if os.path.exists('data/demo/labels/stress@simulation_1.json') else 'data/demo/labels/stress.json'
print(json.load(open(f))['split'])")"
restore
case_ "4 resume with other split" $R train-ae demo --split simulation_2 --labels stress --run runs/r --resume --device cpu
python3 - <<'EOF'
import json; p = "runs/pristine/ae/meta.json"
import shutil; shutil.copytree("runs/pristine", "runs/int1")
m = json.load(open("runs/int1/ae/meta.json")); m["status"] = "training"; json.dump(m, open("runs/int1/ae/meta.json", "w"))
shutil.copytree("runs/pristine", "runs/int2")
m = json.load(open("runs/int2/gan/meta.json")); m["status"] = "training"; json.dump(m, open("runs/int2/gan/meta.json", "w"))
EOF
case_ "5 train-gan on interrupted ph1" $R train-gan --run runs/int1 --device cpu --max-epochs 1
case_ "5 predict on interrupted ph2" $R predict --run runs/int2 --device cpu --cells 5
$BIN/python - <<'EOF'
import anndata as ad
a = ad.read_h5ad("data/demo/perturb_processed.h5ad")
a.obs["condition"] = a.obs["condition"].astype(str).str.replace("G0", "H0")
a.write_h5ad("otherscreen.h5ad")
EOF
q $R fetch other --from otherscreen.h5ad
cp -r data data_pristine
case_ "6 evaluate other dataset's preds" $R evaluate other --predictions runs/r/predictions.h5ad --split simulation_1 --device cpu --no-plots
case_ "7 --max-epochs 0" $R train-ae demo --split simulation_1 --labels stress --run runs/z --device cpu --max-epochs 0 "${TINY[@]}"
for c in split predict evaluate fetch; do
  for s in -1 4294967296; do
    case $c in
      split) args=(split demo --seed $s);;
      predict) args=(predict --run runs/r --device cpu --cells 5 --seed $s);;
      evaluate) args=(evaluate demo --predictions runs/r/predictions.h5ad --device cpu --no-plots --seed $s);;
      fetch) args=(fetch demo --force --seed $s);;
    esac
    case_ "T $c --seed $s" $R "${args[@]}"
  done
done
case_ "T --batch-size 0" $R train-ae demo --split simulation_1 --labels stress --run runs/b --device cpu --batch-size 0
case_ "T --batch-size -3" $R train-ae demo --split simulation_1 --labels stress --run runs/b --device cpu --batch-size -3
case_ "T --set ae.lr=-1" $R train-ae demo --split simulation_1 --labels stress --run runs/b --device cpu --set ae.lr=-1
case_ "T --set model.n_heads=3" $R train-ae demo --split simulation_1 --labels stress --run runs/b --device cpu --set model.n_heads=3
touch afile
case_ "T --data-dir is a file (fetch)" $R fetch demo --data-dir afile
case_ "T --data-dir is a file (split)" $R split demo --data-dir afile
case_ "T run dir is a file (train-ae)" $R train-ae demo --split simulation_1 --labels stress --run afile --device cpu
mkdir -p adir
case_ "T predict --out is a dir" $R predict --run runs/r --device cpu --cells 5 --out adir
case_ "T evaluate --out is a file" $R evaluate demo --predictions runs/r/predictions.h5ad --device cpu --no-plots --out afile
cp -r runs/pristine runs/garb; echo 'garbage{' > runs/garb/ae/meta.json
case_ "T garbage meta.json (predict)" $R predict --run runs/garb --device cpu --cells 5
case_ "T predict --cells 10000000" $R predict --run runs/r --device cpu --cells 10000000
cp -r data/demo outside; rm -rf outside/splits outside/labels
case_ "O split ../outside" $R split ../outside
ls -d "$W/outside/splits" 2>/dev/null && echo "   -> wrote $W/outside/splits (outside the data folder)"
$BIN/python - <<'EOF'
import anndata as ad, numpy as np
a = ad.read_h5ad("data/demo/perturb_processed.h5ad")
a[:1].copy().write_h5ad("onecell.h5ad")
c = a[a.obs["condition"].astype(str) == "ctrl"].copy(); c.write_h5ad("allctrl.h5ad")
EOF
case_ "O one-cell import" $R fetch one --from onecell.h5ad
case_ "O all-control import" $R fetch allc --from allctrl.h5ad
$BIN/python - <<'EOF'
import json; m = json.load(open("runs/r/ae/meta.json"))
d = [c for c in m["conditions"] if "+" in c and "ctrl" not in c][0]
a, b = d.split("+"); open("swapped.txt", "w").write(f"{b}+{a}")
EOF
case_ "O predict --conditions B+A" $R predict --run runs/r --device cpu --cells 5 --conditions "$(cat swapped.txt)" --out swapped.h5ad
grep -h "never measured\|predicted" out.txt | head -2
