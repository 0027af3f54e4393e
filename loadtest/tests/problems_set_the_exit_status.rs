//! A run that completes but finds problems exits 3 (after writing its results and its
//! plot), and `--exit-zero` keeps exit 0 for the same run. The problem is provoked for real: messages
//! are published to a UDP port nobody listens on, so every delivery is lost.

mod common;

use std::time::Duration;

use common::{free_udp_port, run_load, start_ringcast, tmp_path};

fn lossy_fanout(rc: &common::Ringcast, extra: &[&str]) -> common::Outcome {
    let url = format!("ws://127.0.0.1:{}/ws?channels=bench", rc.ws);
    let publish = format!("udp://127.0.0.1:{}", free_udp_port());
    let mut args = vec![
        "fanout",
        "--url",
        &url,
        "-n",
        "20",
        "--publish",
        &publish,
        "--messages",
        "10",
        "--msg-rate",
        "100",
        "--drain",
        "1",
        "--timeout",
        "30",
    ];
    args.extend_from_slice(extra);
    run_load(&args, Duration::from_secs(60))
}

fn problems(out: &common::Outcome) -> usize {
    let json = out
        .json
        .as_ref()
        .unwrap_or_else(|| panic!("no JSON results written:\n{}", out.output));
    json["problems"].as_array().map_or(0, Vec::len)
}

#[test]
fn lost_messages_exit_3_unless_exit_zero() {
    let rc = start_ringcast(&[]);

    let plot = tmp_path("plot.svg");
    let plot_arg = plot.to_string_lossy().into_owned();
    let out = lossy_fanout(&rc, &["--plot", &plot_arg]);
    assert_eq!(out.status.code(), Some(3), "output:\n{}", out.output);
    let svg = std::fs::read_to_string(&plot)
        .unwrap_or_else(|e| panic!("no plot at {}: {e}\n{}", plot.display(), out.output));
    let _ = std::fs::remove_file(&plot);
    assert!(svg.starts_with("<svg"), "{svg}");
    for text in ["latency (ms)", "deliveries per second", "open connections"] {
        assert!(svg.contains(text), "plot lacks {text:?}");
    }
    assert!(problems(&out) > 0, "output:\n{}", out.output);
    assert!(out.output.contains("PROBLEM"), "output:\n{}", out.output);
    assert!(
        out.output.contains("--exit-zero"),
        "output:\n{}",
        out.output
    );

    let out = lossy_fanout(&rc, &["--exit-zero"]);
    assert_eq!(out.status.code(), Some(0), "output:\n{}", out.output);
    assert!(problems(&out) > 0, "output:\n{}", out.output);
}
