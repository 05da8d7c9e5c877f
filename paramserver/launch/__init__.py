"""Start a cluster: local processes (:class:`LocalCluster`, ``paramserver run``) or one role of a
multi-host cluster (``paramserver coordinator|server``).

* ``local.py``     :class:`LocalCluster`: a coordinator and servers as local processes, the
                   coordinator's socket bound here and handed over, dead servers restarted
* ``job.py``       :func:`run_job` (``paramserver run``): a local cluster plus one process per
                   worker, the job's exit code, Ctrl-C/SIGTERM/SIGHUP
* ``roles.py``     :func:`serve_coordinator`, :func:`serve_server`: one role in this process,
                   stopped cleanly by SIGTERM or SIGINT
* ``children.py``  process supervision: start, prefix output, stop (grace, SIGTERM, SIGKILL),
                   and ``PR_SET_PDEATHSIG`` so that children die with their parent

Every process started here is stopped when its parent stops: on success, on error and on
Ctrl-C; even a parent killed with SIGKILL takes its children along (Linux). Linux sends that
signal when the *thread* that started a child exits, not the process: start a
:class:`LocalCluster` from the main thread, or from a thread that outlives the cluster.
"""

from paramserver.launch.children import die_with_parent
from paramserver.launch.job import run_job
from paramserver.launch.local import LocalCluster
from paramserver.launch.roles import serve_coordinator, serve_server

# the name paramserver.ray imported before this became a package
_die_with_parent = die_with_parent

__all__ = ["LocalCluster", "die_with_parent", "run_job", "serve_coordinator", "serve_server"]
