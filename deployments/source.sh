#!/bin/sh
# Where workers get the code: the repository and branch of the deployments' git_clone pull step
# (deployments/prefect.yaml), decided where `prefect deploy` runs and stored in the deployments.
#
#   sh deployments/source.sh repository   # $NEWSGROUPS_LSTM_REPO, else this checkout's `origin` remote
#   sh deployments/source.sh branch       # $NEWSGROUPS_LSTM_BRANCH, else this checkout's current branch
#
# The branch must exist in the repository (checked with `git ls-remote`), so a typo or an unpushed
# branch fails `prefect deploy` instead of the night's run on a worker.
set -eu

fail() {
    echo "deployments/source.sh: $*" >&2
    exit 1
}

repository=${NEWSGROUPS_LSTM_REPO:-$(git remote get-url origin 2>/dev/null || true)}
[ -n "$repository" ] || fail "set NEWSGROUPS_LSTM_REPO to a git URL every worker can clone (this checkout has no 'origin' remote)"
branch=${NEWSGROUPS_LSTM_BRANCH:-$(git symbolic-ref --short -q HEAD 2>/dev/null || true)}
[ -n "$branch" ] || fail "set NEWSGROUPS_LSTM_BRANCH to the branch workers should run (this checkout is not on a branch)"
if ! found=$(git ls-remote --heads "$repository" "refs/heads/$branch" 2>&1); then
    fail "cannot read $repository (NEWSGROUPS_LSTM_REPO): $(printf '%s\n' "$found" | head -n 1)"
fi
[ -n "$found" ] || fail "no branch '$branch' in $repository (NEWSGROUPS_LSTM_BRANCH; push it first)"

case "${1:-}" in
    repository) echo "$repository" ;;
    branch) echo "$branch" ;;
    *) fail "usage: sh deployments/source.sh repository|branch" ;;
esac
