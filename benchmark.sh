#!/usr/bin/env bash
# benchmark.sh -- fair, resumable comparison of the agents of this repository.
#
# usage: ./benchmark.sh SUITE [--seeds N] [--workers W] [--out DIR] [--slurm] [--dry-run]
#                             [--only REGEX] [--scale F] [--peers]
#
#   SUITE        smoke | memory | ablation | popgym | exploration | speed | mujoco | atari (see the SETTINGS table)
#   --seeds N    seeds 1..N for every (setting, agent) (default: the suite's, >= 3 except smoke)
#   --workers W  runs in parallel on this machine, one torch thread each (default: cores;
#                speed: 1, so SPS numbers do not share cores)
#   --out DIR    run directories go to DIR/<run-name> (default: runs)
#   --slurm      write DIR/<suite>.<id>.jobs.sh as an sbatch array (one task per run; <id> is a
#                checksum of the run list) and submit it
#                where `sbatch` exists; --workers W then throttles the array to W tasks at once
#   --dry-run    print the run list with each run's status (todo, done, resume, no-script) --
#                or, with --slurm, the job script -- and run nothing
#   --only REGEX keep only runs whose name matches the (bash extended) REGEX,
#                e.g. --only '__ppo__' or --only 'delay(16|64)'
#   --scale F    multiply every training budget by F (e.g. 0.05 for a quick partial run);
#                the runs are then labelled <suite>-xF so they never mix with full-budget runs
#   --peers      add the sb3 PPO / sb3-contrib RecurrentPPO peers (peers.py, needs
#                `pip install -r requirements-peers.txt`) to every setting of the suite
#
# Every run is `python3 SCRIPT --env-id E --env-kwargs K --seed S --total-timesteps T
# --eval-episodes N --threads 1 --run-name NAME AGENT_FLAGS`, named SUITE__SETTING__AGENT__SEED.
# Within a setting every agent gets the same budget and the same evaluation.
# Resumable: a run whose eval.json exists is skipped; one with a checkpoint.pt but no
# eval.json is continued with `--resume`. A run whose script is missing or that fails is
# reported (log: DIR/<run-name>/stdout.log) without stopping the others; the exit status is 1
# if any run did not finish. Local runs are started with `nice -n 5`. A finished local suite
# is summarised with summarize.py into DIR/summary/. PYTHON (default python3) is the
# interpreter the runs use. Do not run the same suite into the same DIR twice at once.
set -euo pipefail
# The whole script is one { ... } block: bash parses it before running any of it, so editing or
# updating this file while a long suite runs cannot derail the running copy.
{
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python3}

# =======================================================================================
# THE SUITE TABLES -- edit here. Fields are separated by '|'; lines starting with # are comments.
# =======================================================================================
# Agents: a name (used in run names, no '__'), the script, and the flags that make the agent.
AGENTS='
# name                     | script                    | flags
ppo                        | ppo_baseline.py           |
lstm-ppo                   | recurrent_ppo_baseline.py |
gru-ppo                    | recurrent_ppo_baseline.py | --cell gru
# the recurrent baselines with the inputs (previous action and reward) and the vector preset of trace_ppo
lstm-ppo-mem               | recurrent_ppo_baseline.py | --memory-preset
gru-ppo-mem                | recurrent_ppo_baseline.py | --cell gru --memory-preset
# the transformer over the last 16 steps (the memory budget of 16 slots) and over the whole episode
trxl-16                    | transformer_ppo_baseline.py | --window 16 --memory-preset
trxl-full                  | transformer_ppo_baseline.py | --window 0 --memory-preset
trace-learned              | trace_ppo.py              | --retention learned
trace-fifo                 | trace_ppo.py              | --retention fifo
trace-persist              | trace_ppo.py              | --retention learned --persistent-slots 4
# trace_ppo with one of its mechanisms off (the ablation suite): no exploration floor, no score prior on the read,
# no sign split of the observation
trace-no-floor             | trace_ppo.py              | --explore-visits 0
trace-no-prior             | trace_ppo.py              | --no-score-prior
trace-no-crelu             | trace_ppo.py              | --no-crelu-obs
# PPO with the vector settings of trace_ppo: observation and reward normalisation, no entropy bonus
ppo-norm                   | ppo_baseline.py           | --normalize True --ent-coef 0
# AdaMemento on sparse-reward tasks (success = return > 0, issue 3), and its ablations:
adamemento                 | adamemento_ppo.py         | --success-rule positive
ppo-rnd                    | adamemento_ppo.py         | --success-rule positive --intrinsic rnd --no-reflection
adamemento-no-reflection   | adamemento_ppo.py         | --success-rule positive --no-reflection
adamemento-no-coarse       | adamemento_ppo.py         | --success-rule positive --no-coarse
adamemento-no-fine         | adamemento_ppo.py         | --success-rule positive --no-fine
adamemento-no-intrinsic    | adamemento_ppo.py         | --success-rule positive --intrinsic none
# AdaMemento on dense rewards (success = return above the running quantile, the default):
adamemento-dense           | adamemento_ppo.py         | --success-rule quantile
sb3-ppo                    | peers.py                  | --algo ppo
sb3-lstm-ppo               | peers.py                  | --algo recurrent_ppo
'
PEER_AGENTS="sb3-ppo sb3-lstm-ppo"

# Settings: one environment configuration with ONE budget (total timesteps) and ONE
# evaluation (episodes) shared by all its agents. Memory budgets are 2000 training episodes
# (2000 x episode length) as in issue 5; memory evaluation is >= 200 episodes, each
# episode run with the agent's state carried through it (the scripts' evaluate()).
SETTINGS='
# suite     | env id                  | env kwargs           | timesteps | eval eps | agents
smoke       | MemoryTask-v0           | delay=4 difficulty=1 | 2048      | 20       | ppo lstm-ppo trace-learned trace-fifo adamemento ppo-rnd
memory      | MemoryTask-v0           | delay=16 difficulty=1   | 32000   | 200 | ppo lstm-ppo lstm-ppo-mem gru-ppo gru-ppo-mem trxl-16 trxl-full trace-learned trace-fifo
memory      | MemoryTask-v0           | delay=64 difficulty=1   | 128000  | 200 | ppo lstm-ppo lstm-ppo-mem gru-ppo gru-ppo-mem trxl-16 trxl-full trace-learned trace-fifo
memory      | MemoryTask-v0           | delay=256 difficulty=1  | 512000  | 200 | ppo lstm-ppo lstm-ppo-mem gru-ppo gru-ppo-mem trxl-16 trxl-full trace-learned trace-fifo
memory      | MemoryTask-v0           | delay=1024 difficulty=1 | 2048000 | 200 | ppo lstm-ppo lstm-ppo-mem gru-ppo gru-ppo-mem trxl-16 trxl-full trace-learned trace-fifo
memory      | MemoryTask-v0           | delay=64 difficulty=1 cue_time=random   | 128000  | 200 | ppo lstm-ppo lstm-ppo-mem gru-ppo gru-ppo-mem trxl-16 trxl-full trace-learned trace-fifo
memory      | MemoryTask-v0           | delay=256 difficulty=1 cue_time=random  | 512000  | 200 | ppo lstm-ppo lstm-ppo-mem gru-ppo gru-ppo-mem trxl-16 trxl-full trace-learned trace-fifo
memory      | MemoryTask-v0           | delay=1024 difficulty=1 cue_time=random | 2048000 | 200 | ppo lstm-ppo lstm-ppo-mem gru-ppo gru-ppo-mem trxl-16 trxl-full trace-learned trace-fifo
memory      | PassiveTMaze-v0         | length=100           | 202000    | 200      | ppo ppo-norm lstm-ppo lstm-ppo-mem gru-ppo gru-ppo-mem trxl-16 trxl-full trace-learned trace-fifo
memory      | PassiveTMaze-v0         | length=500           | 1002000   | 200      | ppo ppo-norm lstm-ppo lstm-ppo-mem gru-ppo gru-ppo-mem trxl-16 trxl-full trace-learned trace-fifo
memory      | PassiveTMaze-v0         | length=1500          | 3002000   | 200      | ppo ppo-norm lstm-ppo lstm-ppo-mem gru-ppo gru-ppo-mem trxl-16 trxl-full trace-learned trace-fifo
memory      | MultiCueTask-v0         | delay=256 cues=3     | 512000    | 200      | ppo lstm-ppo lstm-ppo-mem gru-ppo gru-ppo-mem trxl-16 trxl-full trace-learned trace-fifo
memory      | RecallAcrossEpisodes-v0 |                      | 200000    | 200      | ppo lstm-ppo lstm-ppo-mem gru-ppo gru-ppo-mem trxl-16 trxl-full trace-learned trace-fifo trace-persist
ablation    | MemoryTask-v0           | delay=256 difficulty=1 cue_time=random  | 512000  | 200 | trace-learned trace-no-floor trace-no-prior trace-no-crelu
ablation    | PassiveTMaze-v0         | length=500           | 1002000   | 200      | trace-learned trace-no-floor trace-no-prior trace-no-crelu
popgym      | popgym:popgym-RepeatFirstMedium-v0 |     | 830000    | 100      | ppo lstm-ppo-mem gru-ppo-mem trace-learned
popgym      | popgym:popgym-RepeatFirstHard-v0   |     | 1662000   | 100      | ppo lstm-ppo-mem gru-ppo-mem trace-learned
exploration | CliffWalkingFail-v0     |                      | 100000    | 100      | ppo ppo-rnd adamemento adamemento-no-reflection adamemento-no-coarse adamemento-no-fine adamemento-no-intrinsic
exploration | DarkChamber-v0          | cell_pixels=1        | 300000    | 100      | ppo ppo-rnd adamemento adamemento-no-reflection adamemento-no-coarse adamemento-no-fine adamemento-no-intrinsic
exploration | FourRooms-v0            |                      | 300000    | 100      | ppo ppo-rnd adamemento adamemento-no-reflection adamemento-no-coarse adamemento-no-fine adamemento-no-intrinsic
speed       | MemoryTask-v0           | delay=16 difficulty=1   | 65536   | 8   | ppo lstm-ppo gru-ppo trxl-16 trxl-full trace-learned trace-fifo
speed       | MemoryTask-v0           | delay=64 difficulty=1   | 65536   | 8   | ppo lstm-ppo gru-ppo trxl-16 trxl-full trace-learned trace-fifo adamemento ppo-rnd
speed       | MemoryTask-v0           | delay=256 difficulty=1  | 65536   | 8   | ppo lstm-ppo gru-ppo trxl-16 trxl-full trace-learned trace-fifo
speed       | MemoryTask-v0           | delay=1024 difficulty=1 | 65536   | 8   | ppo lstm-ppo gru-ppo trxl-16 trxl-full trace-learned trace-fifo
speed       | MemoryTask-v0           | delay=4096 difficulty=1 | 65536   | 8   | ppo lstm-ppo gru-ppo trxl-16 trxl-full trace-learned trace-fifo
mujoco      | HalfCheetah-v5          |                      | 1000000   | 10       | ppo lstm-ppo trace-learned adamemento-dense
mujoco      | Hopper-v5               |                      | 1000000   | 10       | ppo lstm-ppo trace-learned adamemento-dense
mujoco      | Walker2d-v5             |                      | 1000000   | 10       | ppo lstm-ppo trace-learned adamemento-dense
atari       | ALE/MontezumaRevengeRooms-v5 |                      | 50000000  | 10       | ppo ppo-rnd adamemento lstm-ppo
atari       | ALE/Pong-v5             |                      | 10000000  | 10       | ppo lstm-ppo adamemento-dense
atari       | ALE/Breakout-v5         |                      | 10000000  | 10       | ppo lstm-ppo adamemento-dense
atari       | ALE/Seaquest-v5         |                      | 10000000  | 10       | ppo lstm-ppo adamemento-dense
'

# Per suite: default seeds, default local workers ("cores" = nproc) and the sbatch resources
# of one array task. Atari is the GPU recipe (8 envs on 8 CPUs feeding one GPU).
SUITES='
# suite     | seeds | workers | sbatch options
smoke       | 2     | cores   | --cpus-per-task=1 --mem=4G --time=00:30:00
memory      | 3     | cores   | --cpus-per-task=1 --mem=4G --time=24:00:00
ablation    | 3     | cores   | --cpus-per-task=1 --mem=4G --time=12:00:00
popgym      | 3     | cores   | --cpus-per-task=1 --mem=4G --time=24:00:00
exploration | 3     | cores   | --cpus-per-task=1 --mem=4G --time=12:00:00
speed       | 3     | 1       | --cpus-per-task=1 --mem=4G --time=02:00:00 --exclusive
mujoco      | 3     | cores   | --cpus-per-task=1 --mem=4G --time=24:00:00
atari       | 3     | cores   | --cpus-per-task=8 --gres=gpu:1 --mem=32G --time=48:00:00
'

# =======================================================================================
die() { echo "benchmark.sh: error: $*" >&2; exit 2; }
rows() { grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' <<<"$1"; }
trim() { local s=$1; s=${s#"${s%%[![:space:]]*}"}; printf '%s' "${s%"${s##*[![:space:]]}"}"; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | grep '^#' | sed 's/^# \{0,1\}//'; }

declare -A AGENT_SCRIPT AGENT_FLAGS SUITE_SEEDS SUITE_WORKERS SUITE_SBATCH
while IFS='|' read -r name script flags; do
  name=$(trim "$name"); AGENT_SCRIPT[$name]=$(trim "$script"); AGENT_FLAGS[$name]=$(trim "$flags")
done < <(rows "$AGENTS")
SUITE_NAMES=()
while IFS='|' read -r suite seeds workers sbatch; do
  suite=$(trim "$suite"); SUITE_NAMES+=("$suite")
  SUITE_SEEDS[$suite]=$(trim "$seeds"); SUITE_WORKERS[$suite]=$(trim "$workers")
  SUITE_SBATCH[$suite]=$(trim "$sbatch")
done < <(rows "$SUITES")

# ---- arguments ------------------------------------------------------------------------
SUITE="" SEEDS="" WORKERS="" WORKERS_SET="" OUT="runs" SLURM=0 DRY=0 ONLY="" SCALE="1" PEERS=0
need() { [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --seeds) need "$@"; SEEDS=$2; shift 2 ;;
    --workers) need "$@"; WORKERS=$2; WORKERS_SET=1; shift 2 ;;
    --out) need "$@"; OUT=$2; shift 2 ;;
    --only) need "$@"; ONLY=$2; shift 2 ;;
    --scale) need "$@"; SCALE=$2; shift 2 ;;
    --slurm) SLURM=1; shift ;;
    --dry-run) DRY=1; shift ;;
    --peers) PEERS=1; shift ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) [[ -z $SUITE ]] || die "one SUITE expected, got '$SUITE' and '$1'"; SUITE=$1; shift ;;
  esac
done
[[ -n $SUITE ]] || die "missing SUITE (one of: ${SUITE_NAMES[*]})"
[[ -n ${SUITE_SEEDS[$SUITE]+x} ]] || die "unknown suite '$SUITE' (one of: ${SUITE_NAMES[*]})"
SEEDS=${SEEDS:-${SUITE_SEEDS[$SUITE]}}
WORKERS=${WORKERS:-${SUITE_WORKERS[$SUITE]}}
[[ $WORKERS == cores ]] && WORKERS=$(nproc)
[[ $SEEDS =~ ^[1-9][0-9]*$ ]] || die "--seeds must be a positive integer, got '$SEEDS'"
[[ $WORKERS =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive integer, got '$WORKERS'"
[[ $SCALE =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)$ ]] && awk -v s="$SCALE" 'BEGIN{exit !(s > 0)}' \
  || die "--scale must be a positive number, got '$SCALE'"
if [[ -n $ONLY ]]; then
  rc=0; [[ "" =~ $ONLY ]] || rc=$?
  [[ $rc -ne 2 ]] || die "--only: invalid regular expression '$ONLY'"
fi
[[ $PEERS == 0 || $SUITE != atari ]] || die "--peers is not available for atari (peers.py has no Atari preprocessing)"
LABEL=$SUITE
awk -v s="$SCALE" 'BEGIN{exit !(s == 1)}' || LABEL="$SUITE-x$SCALE"
OUT=$(realpath -m "$OUT")

# ---- the run list -----------------------------------------------------------------------
NAMES=() SCRIPTS=() CMDS=()
while IFS='|' read -r suite env_id kwargs steps episodes agents; do
  [[ $(trim "$suite") == "$SUITE" ]] || continue
  env_id=$(trim "$env_id"); kwargs=$(trim "$kwargs"); episodes=$(trim "$episodes")
  steps=$(awk -v t="$(trim "$steps")" -v s="$SCALE" 'BEGIN{v = int(t * s + 0.5); print (v < 1 ? 1 : v)}')
  setting=${env_id//\//_}
  for kv in $kwargs; do setting+="-${kv//=/}"; done
  setting=${setting//[^A-Za-z0-9.-]/_}
  agent_list=$(trim "$agents"); [[ $PEERS == 0 ]] || agent_list+=" $PEER_AGENTS"
  for agent in $agent_list; do
    [[ -n ${AGENT_SCRIPT[$agent]+x} ]] || die "SETTINGS table: unknown agent '$agent' (not in AGENTS)"
    for ((seed = 1; seed <= SEEDS; seed++)); do
      name="${LABEL}__${setting}__${agent}__${seed}"
      [[ -z $ONLY || $name =~ $ONLY ]] || continue
      script="$HERE/${AGENT_SCRIPT[$agent]}"
      # shellcheck disable=SC2086  # env kwargs and agent flags are word lists by design
      cmd=$(printf '%q ' "$name" "$script" --env-id "$env_id" ${kwargs:+--env-kwargs $kwargs} \
            --seed "$seed" --total-timesteps "$steps" --eval-episodes "$episodes" --threads 1 \
            --run-name "$name" ${AGENT_FLAGS[$agent]})
      NAMES+=("$name"); SCRIPTS+=("$script"); CMDS+=("${cmd% }")
    done
  done
done < <(rows "$SETTINGS")
N=${#NAMES[@]}
[[ $N -gt 0 ]] || die "no runs in suite '$SUITE'${ONLY:+ match --only '$ONLY'}"

status() {  # status INDEX -> done | resume | no-script | todo
  local dir="$OUT/${NAMES[$1]}"
  if [[ -f $dir/eval.json ]]; then echo done
  elif [[ ! -f ${SCRIPTS[$1]} ]]; then echo no-script
  elif [[ -f $dir/checkpoint.pt ]]; then echo resume
  else echo todo; fi
}

# ---- the job script: one task per run, used by Slurm (array) and by the local workers -----
job_script() {
  local commit throttle=""
  commit=$(git -C "$HERE" rev-parse --short HEAD 2>/dev/null || echo unknown)
  [[ -z $(git -C "$HERE" status --porcelain --untracked-files=no 2>/dev/null) ]] || commit+="-dirty"
  [[ $SLURM == 0 || -z $WORKERS_SET ]] || throttle="%$WORKERS"
  cat <<EOF
#!/usr/bin/env bash
#SBATCH --job-name=bench-$LABEL
#SBATCH --array=0-$((N - 1))$throttle
#SBATCH --output=$OUT/slurm-%A_%a.out
EOF
  for opt in ${SUITE_SBATCH[$SUITE]}; do echo "#SBATCH $opt"; done
  cat <<EOF
# Generated by: benchmark.sh $ARGV
# Repository $HERE at commit $commit; $N runs. Task i runs case i below:
#   under Slurm: sbatch this file;  locally: bash this file i
set -uo pipefail
task=\${1:-\${SLURM_ARRAY_TASK_ID:?give a task index 0..$((N - 1))}}
PY=\${PYTHON:-$PYTHON}
# The scripts write runs/<run-name>; run them from a directory whose runs/ is $OUT.
mkdir -p "$OUT/.root" && cd "$OUT/.root" || exit 1
[[ -e runs ]] || ln -s .. runs 2>/dev/null || [[ -e runs ]] || exit 1

run() {  # run NAME SCRIPT ARGS...: skipped if finished, continued from its checkpoint if any
  local name=\$1 script=\$2 dir=runs/\$1
  shift 2
  if [[ -f \$dir/eval.json ]]; then echo "skip    \$name (eval.json exists)"; return 0; fi
  if [[ ! -f \$script ]]; then echo "FAILED  \$name: script \$script does not exist" >&2; return 1; fi
  mkdir -p "\$dir"
  if [[ -f \$dir/checkpoint.pt ]]; then set -- --resume "\$dir"; echo "resume  \$name"; else echo "start   \$name"; fi
  if "\$PY" "\$script" "\$@" >>"\$dir/stdout.log" 2>&1 && [[ -f \$dir/eval.json ]]; then
    echo "done    \$name"
  else
    echo "FAILED  \$name: \$(tail -n 1 "\$dir/stdout.log") (log: $OUT/\$name/stdout.log)" >&2
    return 1
  fi
}

case \$task in
EOF
  local i
  for ((i = 0; i < N; i++)); do echo "  $i) run ${CMDS[$i]} ;;"; done
  cat <<EOF
  *) echo "no task \$task (0..$((N - 1)))" >&2; exit 2 ;;
esac
EOF
}

# The invocation that reproduces this run list (recorded in the job script).
ARGV="$SUITE --seeds $SEEDS --out $OUT"
[[ -z $ONLY ]] || ARGV+=" --only '$ONLY'"
[[ $SCALE == 1 ]] || ARGV+=" --scale $SCALE"
[[ $PEERS == 0 ]] || ARGV+=" --peers"

if [[ $DRY == 1 ]]; then
  if [[ $SLURM == 1 ]]; then job_script; exit 0; fi
  echo "# benchmark.sh $ARGV: $N runs, $WORKERS workers -> $OUT"
  echo "# status run-name command"
  for ((i = 0; i < N; i++)); do echo "$(status "$i") ${NAMES[$i]} $PYTHON ${CMDS[$i]#* }"; done
  exit 0
fi

mkdir -p "$OUT"
# One job script per distinct run list, so invocations with other --only/--seeds/--peers into
# the same DIR never renumber each other's tasks.
JOB="$OUT/$LABEL.$(printf '%s\n' "${NAMES[@]}" | cksum | cut -d' ' -f1).jobs.sh"
job_script >"$JOB"
if [[ $SLURM == 1 ]]; then
  if command -v sbatch >/dev/null; then
    sbatch "$JOB"
  else
    echo "benchmark.sh: sbatch not found; wrote $JOB ($N array tasks) -- submit it with: sbatch $JOB"
  fi
  exit 0
fi

before=0 missing=()
for ((i = 0; i < N; i++)); do
  [[ -f $OUT/${NAMES[$i]}/eval.json ]] && before=$((before + 1))
  [[ -f ${SCRIPTS[$i]} ]] || missing+=("${SCRIPTS[$i]##*/}")
done
echo "benchmark.sh: $LABEL: $N runs ($before already finished), $WORKERS workers -> $OUT"
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "benchmark.sh: warning: missing scripts, their runs will fail: $(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')" >&2
fi
seq 0 $((N - 1)) | xargs -P "$WORKERS" -n 1 nice -n 5 bash "$JOB" || true

failed=()
for ((i = 0; i < N; i++)); do [[ -f $OUT/${NAMES[$i]}/eval.json ]] || failed+=("${NAMES[$i]}"); done
echo "benchmark.sh: $LABEL: $((N - ${#failed[@]}))/$N runs finished ($before skipped as already finished), ${#failed[@]} failed"
for name in "${failed[@]}"; do echo "  not finished: $name (log: $OUT/$name/stdout.log)"; done
if [[ $((N - ${#failed[@]})) -gt 0 ]]; then
  "$PYTHON" "$HERE/summarize.py" "$OUT" --suite "$LABEL" || echo "benchmark.sh: summarize.py failed" >&2
fi
if [[ ${#failed[@]} -eq 0 ]]; then exit 0; else exit 1; fi
}
