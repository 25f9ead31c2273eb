//! `loadgen`: benchmark load generator for eventfabric and other SSE servers (e.g. Nchan).
//!
//! Opens many raw-TCP SSE subscribers, publishes numbered and timestamped events, and reports
//! delivery (lost / duplicate / out-of-order), publish-to-receive latency, and the server's
//! memory per connection and CPU. A human summary goes to stderr and exactly one JSON line
//! to stdout. See `bench/README.md` for usage.
//!
//! Module map:
//! - [`config`]: flags and validation;  [`run`]: the phases of one run;
//! - [`client`]: one subscriber;  [`publisher`]: the event source (HTTP, Nchan, Redis);
//! - [`http`], [`sse`]: byte-level parsers;  [`seqtrack`]: per-client sequence bookkeeping;
//! - [`latency`]: per-thread histograms;  [`stop`]: per-client stop signal;  [`procstat`]: `/proc` sampling;  [`report`]: output.

mod client;
mod config;
mod http;
mod latency;
mod procstat;
mod publisher;
mod report;
mod run;
mod seqtrack;
mod sse;
mod stop;
mod url;

#[cfg(test)]
mod e2e_tests;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = config::Args::parse();
    let threads = args.threads;
    let cfg = match config::Config::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run::run(cfg));
    // Clients are already stopped; don't wait on anything left over.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(report) => {
            eprint!("{}", report.human());
            // The one JSON line is the output scripts read (`bench/matrix.py`): a failed
            // write (say, a closed pipe) fails the run instead of panicking.
            if let Err(e) = writeln!(std::io::stdout().lock(), "{}", report.json()) {
                eprintln!("loadgen: cannot write the JSON report to stdout: {e}");
                return ExitCode::FAILURE;
            }
            if report.timed_out {
                ExitCode::from(3)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}
