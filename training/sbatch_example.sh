#!/bin/bash
# A SLURM job that survives its time limit: SLURM sends SIGUSR1 90 s before the limit, the trainer saves a
# checkpoint of the last completed step and exits with status 75, and the job requeues itself; the requeued job
# continues with --resume auto (the first start finds nothing to resume and says so). See docs/reliability.md.
#
#   sbatch training/sbatch_example.sh
#
#SBATCH --job-name=fbn
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=fbn-%j.out

RUN_NAME=${RUN_NAME:-fbn-$SLURM_JOB_ID}

# srun forwards SIGUSR1 and SIGTERM (scancel, preemption) to the trainer and its loader workers; the workers
# ignore them and the trainer saves before it exits.
srun python -m fbn_fast.train --config training/paper.toml --name "$RUN_NAME" --resume auto --no-progress "$@"
status=$?

case $status in
  75)  # saved after SIGUSR1: continue in a requeued job
       scontrol requeue "$SLURM_JOB_ID" ;;
  143) # SIGTERM (preemption, scancel): saved; a preempting cluster requeues by itself when --requeue is set
       ;;
esac
exit $status
