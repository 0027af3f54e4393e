//! ringcast's end-to-end tests, built as one test binary: the real server binary with
//! real clients over loopback, one module per behaviour (the module name says what it
//! shows), and the harness they share in [`common`].
//!
//! One binary rather than one per file: each integration-test crate links the whole
//! stack with thin LTO, so sixty binaries spent most of the test build linking
//! (docs/benchmarks.md has the figures).
//!
//! The tests share one process and run concurrently (the default test threads). Nothing
//! here may change process-wide state another test sees: no `std::env::set_var` (pass a
//! child's environment to [`common::Server::start_with_env`]), no `set_current_dir`, no
//! rlimit or signal disposition of the test process itself, and scratch files in
//! `tempfile` directories, not in paths named by the process id. [`common::Deadline`]
//! ends the whole binary when a test hangs past its bound.
//!
//! One test: `cargo test --release --test e2e <module or test name>`.

mod common;

mod accept_rate_queues_a_storm;
mod admin_keeps_alive_and_answers_head;
mod bad_input_gets_clear_error;
mod browser_client_backs_off_with_jitter;
mod browser_client_falls_back_to_sse_and_poll;
mod browser_client_publishes_and_sees_presence;
mod browser_client_receives_and_recovers;
mod browser_client_refreshes_its_token;
mod browser_client_reports_lost_messages;
mod browser_client_takes_the_users_inbox_channel;
mod check_host_passes_or_names_the_blocker;
mod cluster_dedupes_a_resent_publish;
mod cluster_inbox_ack_survives_a_node_kill;
mod cluster_inbox_follows_the_user_across_nodes;
mod cluster_inbox_offsets_survive_expiry;
mod cluster_nodes_share_offsets_over_nats;
mod cluster_presence_spans_nodes;
mod cluster_publish_queue_is_bounded;
mod cluster_routes_by_interest;
mod cluster_subscribe_joins_the_stream;
mod cluster_survives_a_nats_server_loss;
mod cluster_survives_a_node_kill;
mod config_tools_and_startup_log;
mod dead_peer_is_detected;
mod fanout_reaches_every_subscriber;
mod fd_exhaustion_pauses_accept;
mod grafana_dashboard_matches_metrics;
mod inbox_survives_a_full_disk;
mod inbox_survives_restart_and_kill;
mod ingest_key_guards_tcp_and_http;
mod lagging_subscribers_catch_up_from_history;
mod long_poll_answers_whole;
mod long_poll_is_not_a_presence_member;
mod max_connections_is_process_wide;
mod metrics_pass_promtool;
mod offsets_stay_ordered_across_ingest_paths;
mod origin_check_and_cors;
mod per_ip_handshakes_stop_a_slowloris;
mod per_ip_limits_refuse_one_address;
mod presence_is_exact_across_shards;
mod prometheus_rules_match_the_runbook;
mod proxy_header_before_tls;
mod proxy_protocol_names_the_client;
mod recovery_replays_missed_messages;
mod sighup_reload_keeps_1k_clients;
mod sighup_reloads_config;
mod sigterm_drains_with_1001;
mod slow_consumer_is_dropped;
mod slow_handshakes_are_cut_and_capped;
mod sse_and_poll_resume;
mod sse_and_poll_with_independent_clients;
mod sse_carries_identity_features;
mod sse_replay_is_bounded_and_ids_stay_small;
mod started_only_after_every_shard_serves;
mod subscriber_made_channels_go_with_them;
mod systemd_hears_ready_reload_and_stopping;
mod systemd_sandbox_allows_ringcasts_syscalls;
mod systemd_unit_verifies;
mod tls_idle_session_holds_no_buffer;
mod tls_listener_serves_wss_and_https;
mod tokens_decide_who_connects_and_subscribes;
