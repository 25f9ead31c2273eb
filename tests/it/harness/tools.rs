//! Programs some tests need that a fresh machine may lack (nginx, Node.js with the
//! `eventsource` package, Python with redis-py), and the one way a test skips without them.
//!
//! A test asks first, before it starts anything:
//!
//! ```ignore
//! let Some(nginx) = tools::require(tools::nginx()) else { return };
//! ```
//!
//! Without the program, [`require`] prints `SKIP <test name>: <reason>` on stderr and the
//! test returns early and passes. With `EVENTFABRIC_REQUIRE_ALL=1` (as `.ci/run` sets) a
//! missing program fails the test instead, so a run meant to cover everything cannot pass
//! by skipping. `.ci/install-test-deps` installs every program found here, at the paths
//! looked at here. `redis-server` is not optional: without it the Redis tests fail (see
//! `redis.rs`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Set to `1` to turn every skip into a failure.
pub const REQUIRE_ALL: &str = "EVENTFABRIC_REQUIRE_ALL";

/// The found program, or `None` after reporting the test as skipped (see the module docs).
///
/// Call it on the test's own thread (at the top of the test body): the test's name is the
/// name libtest gives that thread.
pub fn require<T>(found: Result<T, String>) -> Option<T> {
    match found {
        Ok(found) => Some(found),
        Err(reason) => {
            skip(&reason);
            None
        }
    }
}

/// Reports the current test as skipped for `reason`, or panics under `REQUIRE_ALL`.
pub fn skip(reason: &str) {
    let current = std::thread::current();
    let test = current.name().unwrap_or("<unnamed test>");
    if std::env::var(REQUIRE_ALL).is_ok_and(|v| v == "1") {
        panic!("{test} cannot run and {REQUIRE_ALL}=1 forbids skipping it: {reason}");
    }
    // Straight to the process's stderr: libtest captures `eprintln!` of a passing test,
    // and a skip has to be seen.
    let line = format!("SKIP {test}: {reason}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// nginx: `$EVENTFABRIC_NGINX`, else Debian's `/usr/sbin/nginx`.
pub fn nginx() -> Result<PathBuf, String> {
    let path = std::env::var_os("EVENTFABRIC_NGINX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx"));
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} not found: this test runs real nginx (apt-get install nginx-light, or \
             .ci/install-test-deps)",
            path.display()
        ))
    }
}

/// The `node_modules` directory that holds the `eventsource` package, when `node` runs too:
/// `$EVENTFABRIC_NODE_PREFIX/node_modules`, else `~/.cache/eventfabric-node/node_modules`
/// (`$XDG_CACHE_HOME` if set).
pub fn node_eventsource() -> Result<PathBuf, String> {
    let prefix = std::env::var_os("EVENTFABRIC_NODE_PREFIX")
        .map(PathBuf::from)
        .or_else(|| cache_dir().map(|c| c.join("eventfabric-node")))
        .ok_or("neither EVENTFABRIC_NODE_PREFIX nor HOME is set")?;
    if !runs(Command::new("node").arg("--version")) {
        return Err("node is not installed (apt-get install nodejs, or \
                    .ci/install-test-deps)"
            .to_owned());
    }
    let modules = prefix.join("node_modules");
    if modules.join("eventsource").is_dir() {
        Ok(modules)
    } else {
        Err(format!(
            "the eventsource package is not in {} (npm install --prefix {} \
             eventsource@3.0.7, or .ci/install-test-deps)",
            modules.display(),
            prefix.display()
        ))
    }
}

/// A Python interpreter that can `import redis`: the venv `.ci/install-test-deps` makes
/// (`$EVENTFABRIC_PRODUCER_VENV`, else `~/.cache/eventfabric-producer-venv`), else `python3`
/// on `PATH`.
pub fn python_with_redis() -> Result<PathBuf, String> {
    python_that_imports("redis", "redis-py")
}

/// A Python interpreter with PyJWT and cryptography (looked for as in
/// [`python_with_redis`]): tokens in the access-control tests are minted by it, not by the
/// gateway's own code.
pub fn python_with_jwt() -> Result<PathBuf, String> {
    python_that_imports("jwt, cryptography", "PyJWT")
}

/// The first of the venv's Python and `python3` that can `import <modules>`.
fn python_that_imports(modules: &str, package: &str) -> Result<PathBuf, String> {
    let venv = std::env::var_os("EVENTFABRIC_PRODUCER_VENV")
        .map(PathBuf::from)
        .or_else(|| cache_dir().map(|c| c.join("eventfabric-producer-venv")));
    let candidates: Vec<PathBuf> = venv
        .map(|v| v.join("bin/python"))
        .into_iter()
        .chain([PathBuf::from("python3")])
        .collect();
    let import = format!("import {modules}");
    candidates
        .iter()
        .find(|python| runs(Command::new(python).args(["-c", &import])))
        .cloned()
        .ok_or_else(|| {
            let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
            format!(
                "no Python that can `{import}` (tried {}; .ci/install-test-deps puts {package} \
                 in the venv)",
                tried.join(", ")
            )
        })
}

/// `$XDG_CACHE_HOME`, else `$HOME/.cache`: where `.ci/install-test-deps` installs.
fn cache_dir() -> Option<PathBuf> {
    let non_empty = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    non_empty("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| non_empty("HOME").map(|h| Path::new(&h).join(".cache")))
}

/// True if `cmd` starts and exits 0 (its output is discarded).
fn runs(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `openssl`, which makes the certificates of the TLS tests.
pub fn openssl() -> Result<PathBuf, String> {
    let found = std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|out| out.status.success());
    if found {
        Ok(PathBuf::from("openssl"))
    } else {
        Err(
            "openssl not found: the TLS tests make their certificates with it \
             (apt-get install openssl, or .ci/install-test-deps)"
                .to_owned(),
        )
    }
}

/// `redis-cli`, with which the cluster tests form and reshard their clusters (Debian ships it
/// with `redis-server`, in `redis-tools`).
pub fn redis_cli() -> Result<PathBuf, String> {
    if runs(Command::new("redis-cli").arg("--version")) {
        Ok(PathBuf::from("redis-cli"))
    } else {
        Err(
            "redis-cli not found: the cluster tests form their clusters with it \
             (apt-get install redis-tools, or .ci/install-test-deps)"
                .to_owned(),
        )
    }
}
