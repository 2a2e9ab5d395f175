//! A cluster end to end: a real `nats-server -js`, two registries on it, and edge nodes in
//! three regions on their own loopback addresses (127.0.0.11–12 for region a, .21–22 for b,
//! .31–32 for c). What it proves: a push reaches every node; a request for a function homed
//! elsewhere is forwarded to its home and served there; a home killed under load costs no
//! more than the requests it had in flight; a drained region's traffic is served by the
//! fallback region; and nodes keep serving with the whole control plane down, also after a
//! restart.

mod support;

use std::path::{Path, PathBuf};
use std::time::Instant;

use support::*;

const REGIONS: [(&str, [&str; 2]); 3] = [
    ("a", ["127.0.0.11", "127.0.0.12"]),
    ("b", ["127.0.0.21", "127.0.0.22"]),
    ("c", ["127.0.0.31", "127.0.0.32"]),
];

/// One `atoll node` of the cluster.
struct Member {
    name: String,
    region: String,
    process: Process,
    http: String,
    admin: String,
    args: Vec<String>,
}

/// Starts `atoll node` named `name` in `region` on `ip` (ports picked by the OS), following
/// `control` (`--registry URL` or `--store nats://…`), with one home node per function and
/// region so forwarding is exercised, and `extra` flags.
fn start_member(control: &[&str], name: &str, region: &str, ip: &str, data: &Path, extra: &[&str]) -> Member {
    let listen = format!("{ip}:0");
    let mut args: Vec<String> = vec!["node".into()];
    args.extend(control.iter().map(|s| s.to_string()));
    for (flag, value) in [
        ("--listen", listen.as_str()),
        ("--admin", listen.as_str()),
        ("--data", data.to_str().unwrap()),
        ("--name", name),
        ("--region", region),
    ] {
        args.push(flag.into());
        args.push(value.into());
    }
    if !extra.contains(&"--drain-delay") {
        args.extend(["--drain-delay".to_string(), "1s".to_string()]);
    }
    if !extra.contains(&"--home-replicas") {
        args.extend(["--home-replicas".to_string(), "1".to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    launch(name, region, args)
}

fn launch(name: &str, region: &str, args: Vec<String>) -> Member {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut process = Process::spawn(name, &refs);
    let admin = process.wait_for_line("admin listening on http://", STARTUP)
        ["admin listening on http://".len()..]
        .trim()
        .to_string();
    let http = process
        .stdout_lines()
        .into_iter()
        .find_map(|line| {
            line.strip_prefix("node listening on http://")
                .map(|s| s.trim().to_string())
        })
        .expect("an HTTP listener");
    Member {
        name: name.into(),
        region: region.into(),
        process,
        http,
        admin,
        args,
    }
}

/// The registry's member list: (name, health) pairs.
fn health(registry: &str) -> Vec<(String, String)> {
    let Ok(response) = http_request(
        url_addr(registry),
        "GET",
        "registry",
        "/v1/nodes",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        b"",
    ) else {
        return Vec::new();
    };
    let members: serde_json::Value = serde_json::from_slice(&response.body).unwrap_or_default();
    members
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or_default().to_string(),
                m["health"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn wait_for_health(registry: &str, names: &[&str], wanted: &str) {
    wait_until(&format!("{names:?} {wanted} at {registry}"), || {
        let listed = health(registry);
        names
            .iter()
            .all(|name| listed.iter().any(|(n, h)| n == name && h == wanted))
    });
}

/// Status and serving node of `GET /` for `host` through `addr` (0 and "" if no answer).
fn served_by(addr: &str, host: &str, headers: &[(&str, &str)]) -> (u16, String) {
    match http_request(addr, "GET", host, "/", headers, b"") {
        Ok(response) => (
            response.status,
            response.header("x-atoll-node").unwrap_or_default().to_string(),
        ),
        Err(_) => (0, String::new()),
    }
}

/// `POST` or `DELETE /drain` with the node's token (the token every test process shares).
fn drain(admin: &str, method: &str) {
    let authorization = format!("Bearer {TOKEN}");
    let response = http_request(
        admin,
        method,
        "admin",
        "/drain",
        &[("Authorization", &authorization)],
        b"",
    )
    .expect("admin answers");
    assert_eq!(response.status, 200, "{method} /drain: {}", response.text());
}

/// NATS, two registries on it, and six nodes (two per region, each region falling back to
/// the other two): regions a and b alternate between the registries, c follows NATS.
struct Cluster {
    _nats: NatsServer,
    registries: Vec<(Process, String)>,
    members: Vec<Member>,
    _data: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        let nats = NatsServer::start();
        let registries = vec![
            start_nats_registry("registry-1", &nats),
            start_nats_registry("registry-2", &nats),
        ];
        let data = tempfile::tempdir().unwrap();
        let mut members = Vec::new();
        for (region, ips) in REGIONS {
            let fallback: Vec<&str> = REGIONS.iter().map(|(r, _)| *r).filter(|r| *r != region).collect();
            let fallback = fallback.join(",");
            for (i, ip) in ips.iter().enumerate() {
                let name = format!("{region}{}", i + 1);
                // Region c follows JetStream directly; the others a registry each.
                let control = match region {
                    "c" => ["--store", nats.url.as_str()],
                    _ => ["--registry", registries[members.len() % 2].1.as_str()],
                };
                // Region c's draining (after SIGTERM) lasts long enough for a test to see it
                // listed before the node is gone; the others stop promptly.
                let drain_delay = if region == "c" { "5s" } else { "1s" };
                members.push(start_member(
                    &control,
                    &name,
                    region,
                    ip,
                    &data.path().join(&name),
                    &["--region-fallback", &fallback, "--drain-delay", drain_delay],
                ));
            }
        }
        let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
        wait_for_health(&registries[1].1, &names, "healthy");
        Cluster {
            _nats: nats,
            registries,
            members,
            _data: data,
        }
    }

    fn member(&self, name: &str) -> &Member {
        self.members.iter().find(|m| m.name == name).unwrap()
    }
}

#[test]
fn a_push_reaches_every_node_and_requests_are_served_by_their_home() {
    let cluster = Cluster::start();
    let pushed = Instant::now();
    push_ok(&cluster.registries[0].1, &example("hello"));
    // Every node has it itself: a request carrying the hop header is served where it lands.
    let mut pending: Vec<&Member> = cluster.members.iter().collect();
    while !pending.is_empty() {
        assert!(
            pushed.elapsed() < STARTUP,
            "not served by {:?}",
            pending.iter().map(|m| &m.name).collect::<Vec<_>>()
        );
        pending.retain(|member| {
            served_by(&member.http, "hello.localhost", &[("x-atoll-hop", "test")])
                != (200, member.name.clone())
        });
        std::thread::sleep(POLL);
    }
    println!("push served by all six nodes after {:?}", pushed.elapsed());

    // Without it, each region's two nodes send the function to the same home, in the region.
    for (region, _) in REGIONS {
        let nodes: Vec<&Member> = cluster.members.iter().filter(|m| m.region == region).collect();
        wait_until(&format!("region {region} agrees on a home"), || {
            let first = served_by(&nodes[0].http, "hello.localhost", &[]);
            let second = served_by(&nodes[1].http, "hello.localhost", &[]);
            first.0 == 200 && first == second
        });
        for _ in 0..10 {
            for node in &nodes {
                let (status, by) = served_by(&node.http, "hello.localhost", &[]);
                assert_eq!(status, 200);
                assert!(
                    by.starts_with(region),
                    "{} forwarded out of its region to {by}",
                    node.name
                );
            }
        }
    }
    // Forwards reuse connections: twenty forwarded requests open (almost) none at the home.
    let region_a: Vec<&Member> = cluster.members.iter().filter(|m| m.region == "a").collect();
    let home_name = served_by(&region_a[0].http, "hello.localhost", &[]).1;
    let home = cluster.member(&home_name);
    let front = region_a.iter().find(|m| m.name != home_name).unwrap();
    let accepted = || {
        metric_value(
            &metrics(&home.admin),
            "atoll_connections_accepted_total",
            &[("listener", &home.http)],
        )
        .unwrap_or(0.0)
    };
    // A forwarded request is counted once, where it ran.
    let served = |member: &Member| {
        metric_value(
            &metrics(&member.admin),
            "atoll_requests_total",
            &[("function", "hello"), ("version", "1"), ("status", "200")],
        )
        .unwrap_or(0.0)
    };
    let (before, home_before, front_before) = (accepted(), served(home), served(front));
    for _ in 0..20 {
        assert_eq!(
            served_by(&front.http, "hello.localhost", &[]),
            (200, home_name.clone())
        );
    }
    let opened = accepted() - before;
    assert!(
        opened <= 2.0,
        "20 forwards opened {opened} connections at the home"
    );
    assert_eq!(served(home) - home_before, 20.0);
    assert_eq!(
        served(front) - front_before,
        0.0,
        "the front node counted forwarded requests too"
    );

    let forwarded: f64 = cluster
        .members
        .iter()
        .filter_map(|m| {
            metric_value(
                &metrics(&m.admin),
                "atoll_forwards_total",
                &[("outcome", "answered")],
            )
        })
        .sum();
    assert!(forwarded >= 30.0, "forwards counted: {forwarded}");

    // A forwarded request reaches the function as the client sent it: same client address,
    // headers and body, and none of the forwarding headers (which a client cannot forge).
    push_ok(&cluster.registries[1].1, &example("echo"));
    let region_a: Vec<&Member> = cluster.members.iter().filter(|m| m.region == "a").collect();
    let post = |member: &Member| {
        http_request(
            &member.http,
            "POST",
            "echo.localhost",
            "/x?q=1",
            &[("X-Test", "kept"), ("X-Atoll-Client", "192.0.2.1:1")],
            b"payload",
        )
        .ok()
        .filter(|response| response.status == 200)
    };
    wait_until("both region a nodes serve echo", || {
        region_a.iter().all(|m| post(m).is_some())
    });
    let forwarded = region_a
        .iter()
        .filter_map(|member| post(member).map(|response| (member.name.clone(), response)))
        .find(|(name, response)| response.header("x-atoll-node") != Some(name.as_str()))
        .expect("one of region a's nodes is not echo's home and forwards it");
    let fields = echo_fields(&forwarded.1.text());
    assert_eq!(fields["REMOTE_ADDR"], "127.0.0.1", "{}", forwarded.1.text());
    assert_eq!(fields["HTTP_X_TEST"], "kept");
    assert_eq!(fields["BODY"], "payload");
    assert_eq!(fields["QUERY_STRING"], "q=1");
    assert!(
        fields.keys().all(|key| !key.starts_with("HTTP_X_ATOLL")),
        "forwarding headers reached the function: {fields:?}"
    );

    // Region a drains: what still arrives there is served by b (its first fallback).
    for member in cluster.members.iter().filter(|m| m.region == "a") {
        drain(&member.admin, "POST");
        let ready = http_get(&member.admin, "admin", "/readyz").unwrap();
        assert_eq!(ready.status, 503, "a draining node is not ready");
    }
    wait_for_health(&cluster.registries[0].1, &["a1", "a2"], "draining");
    for member in cluster.members.iter().filter(|m| m.region == "a") {
        wait_until(&format!("{} forwards to region b", member.name), || {
            served_by(&member.http, "hello.localhost", &[]).1.starts_with('b')
        });
    }
    for _ in 0..20 {
        for name in ["a1", "a2"] {
            let (status, by) = served_by(&cluster.member(name).http, "hello.localhost", &[]);
            assert_eq!(status, 200);
            assert!(by.starts_with('b'), "a drained node's request was served by {by}");
        }
    }
    // Back in rotation.
    drain(&cluster.member("a1").admin, "DELETE");
    wait_until("a1 serves region a again", || {
        served_by(&cluster.member("a1").http, "hello.localhost", &[]).1 == "a1"
    });

    // SIGTERM drains before it stops: the node announces it at once, then exits cleanly.
    let mut cluster = cluster;
    let c1 = cluster.members.iter_mut().find(|m| m.name == "c1").unwrap();
    c1.process.terminate();
    wait_for_health(&cluster.registries[0].1, &["c1"], "draining");
    let c1 = cluster.members.iter_mut().find(|m| m.name == "c1").unwrap();
    assert!(c1.process.wait_exit(STARTUP).success());
}

#[test]
fn killing_a_home_under_load_loses_no_more_than_its_requests_in_flight() {
    let nats = NatsServer::start();
    let (_registry, url) = start_nats_registry("registry", &nats);
    let data = tempfile::tempdir().unwrap();
    let mut members = region_a_members(&url, data.path(), &[]);
    wait_for_health(&url, &["a1", "a2"], "healthy");
    push_ok(&url, &example("hello"));
    let mut home = String::new();
    wait_until("both nodes send hello to one home", || {
        let first = served_by(&members[0].http, "hello.localhost", &[]);
        let second = served_by(&members[1].http, "hello.localhost", &[]);
        home = first.1.clone();
        first.0 == 200 && first == second
    });
    let home_index = members.iter().position(|m| m.name == home).unwrap();
    let front = &members[1 - home_index];
    let (front_http, front_admin) = (front.http.clone(), front.admin.clone());

    const CONCURRENCY: usize = 16;
    const REQUESTS: usize = 4000;
    let load = {
        let target = format!("http://{front_http}/");
        std::thread::spawn(move || {
            std::process::Command::new("ab")
                .args([
                    "-r",
                    "-s",
                    "30",
                    "-n",
                    &REQUESTS.to_string(),
                    "-c",
                    &CONCURRENCY.to_string(),
                ])
                .args(["-H", "Host: hello.localhost", &target])
                .output()
                .expect("ab is installed (apache2-utils)")
        })
    };
    // Kill the home once the front node has been forwarding to it for a while.
    wait_until("the front node forwards under load", || {
        metric_value(
            &metrics(&front_admin),
            "atoll_forwards_total",
            &[("outcome", "answered")],
        )
        .is_some_and(|count| count >= 500.0)
    });
    members[home_index].process.sigkill();
    let output = load.join().unwrap();
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    let field = |name: &str| -> usize {
        report
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map_or(0, |value| {
                value.split_whitespace().next().unwrap().parse().unwrap()
            })
    };
    assert_eq!(field("Complete requests:"), REQUESTS, "{report}");
    let lost = field("Failed requests:") + field("Non-2xx responses:");
    println!("home killed under load: {lost} of {REQUESTS} requests lost");
    assert!(
        lost <= CONCURRENCY,
        "lost {lost} requests, more than the {CONCURRENCY} in flight:\n{report}"
    );
    // The front node serves it now.
    assert_eq!(
        served_by(&front_http, "hello.localhost", &[]),
        (200, members[1 - home_index].name.clone())
    );
}

#[test]
fn nodes_serve_with_the_control_plane_down_and_after_a_restart() {
    let nats = NatsServer::start();
    let (mut registry, url) = start_nats_registry("registry", &nats);
    let data = tempfile::tempdir().unwrap();
    let data_dir = |name: &str| -> PathBuf { data.path().join(name) };
    // One node follows the registry, the other NATS directly.
    let members: Vec<Member> = REGIONS[0]
        .1
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            let name = format!("a{}", i + 1);
            let control = match i {
                0 => ["--registry", url.as_str()],
                _ => ["--store", nats.url.as_str()],
            };
            start_member(&control, &name, "a", ip, &data_dir(&name), &[])
        })
        .collect();
    push_ok(&url, &example("hello"));
    for member in &members {
        wait_for_text(
            &member.http,
            "hello.localhost",
            "/",
            &hello_body("hello.localhost"),
        );
    }
    registry.sigkill();
    drop(nats);
    for _ in 0..20 {
        for member in &members {
            let (status, _) = served_by(&member.http, "hello.localhost", &[]);
            assert_eq!(status, 200, "{} with the control plane down", member.name);
        }
    }
    // Restarted nodes serve from their disk cache, with nothing to ask.
    for member in members {
        let Member {
            name,
            region,
            process,
            args,
            ..
        } = member;
        process.terminate();
        let mut process = process;
        assert!(process.wait_exit(STARTUP).success(), "{name} exits cleanly");
        let again = launch(&name, &region, args);
        wait_for_text(
            &again.http,
            "hello.localhost",
            "/",
            &hello_body("hello.localhost"),
        );
        assert_eq!(
            served_by(&again.http, "hello.localhost", &[]),
            (200, name.clone())
        );
    }
}

/// `dig` at the DNS server `server` (`IP:PORT`) from `source`: the A records for `name`.
fn dig(server: &str, source: &str, name: &str) -> Vec<String> {
    let (ip, port) = server.rsplit_once(':').unwrap();
    let output = std::process::Command::new("dig")
        .args([
            &format!("@{ip}"),
            "-p",
            port,
            "-b",
            source,
            name,
            "A",
            "+short",
            "+tries=1",
            "+time=2",
        ])
        .output()
        .expect("dig is installed (dnsutils)");
    let mut addresses: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .filter(|line| line.parse::<std::net::Ipv4Addr>().is_ok())
        .map(str::to_string)
        .collect();
    addresses.sort();
    addresses
}

#[test]
fn killing_region_a_moves_its_clients_dns_answer_to_region_b() {
    let mut cluster = Cluster::start();
    push_ok(&cluster.registries[0].1, &example("hello"));
    let mut dns = Process::spawn(
        "dns",
        &[
            "dns",
            "--listen",
            "127.0.0.1:0",
            "--zone",
            "localhost",
            "--registry",
            &cluster.registries[1].1,
            "--region-map",
            "127.0.0.8/29=a",
            "--region-map",
            "127.0.0.16/28=b",
            "--region-fallback",
            "a=b,c",
        ],
    );
    let line = dns.wait_for_line("dns listening on udp://", STARTUP);
    let server = line["dns listening on udp://".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    // A client at 127.0.0.9 is in region a: it is told a's nodes.
    wait_until("region a's client gets a's nodes", || {
        dig(&server, "127.0.0.9", "hello.localhost") == ["127.0.0.11", "127.0.0.12"]
    });
    // One dig is one UDP try with a 2 s timeout: poll it like the line above.
    wait_until("region b's client gets b's nodes", || {
        dig(&server, "127.0.0.17", "hello.localhost") == ["127.0.0.21", "127.0.0.22"]
    });

    let killed = Instant::now();
    for member in cluster.members.iter_mut().filter(|m| m.region == "a") {
        member.process.sigkill();
    }
    wait_until("region a's client gets b's nodes", || {
        dig(&server, "127.0.0.9", "hello.localhost") == ["127.0.0.21", "127.0.0.22"]
    });
    println!(
        "DNS answer for region a moved to region b {:?} after the kill",
        killed.elapsed()
    );
    // And those nodes serve it (the DNS names b1 once the registry lists hello, not once
    // b1 has compiled it).
    wait_until("b1 serves hello", || {
        served_by(&cluster.member("b1").http, "hello.localhost", &[]).0 == 200
    });
}

#[test]
fn a_node_whose_pool_is_full_forwards_to_another_home() {
    let nats = NatsServer::start();
    let (_registry, url) = start_nats_registry("registry", &nats);
    let data = tempfile::tempdir().unwrap();
    // Two homes per function in region a, and room for one request at a time.
    let members = region_a_members(&url, data.path(), &["--home-replicas", "2"]);
    wait_for_health(&url, &["a1", "a2"], "healthy");
    let scratch = tempfile::tempdir().unwrap();
    let manifest = write_manifest(
        &scratch.path().join("spin"),
        "spin",
        &example_wasm("fault"),
        &["spin.localhost"],
        "[limits]\ntimeout = \"10s\"\n\n[scale]\nmax_concurrency = 1\n",
    );
    push_ok(&url, &manifest);
    let a1 = &members[0];
    wait_until("a1 knows a2", || knows(&a1.admin, "a2"));
    wait_until("a1 serves spin itself (it is a home)", || {
        served_by_path(&a1.http, "spin.localhost", "/spin?ms=1") == (200, "a1".to_string())
    });
    wait_until("a2 serves spin", || {
        served_by_path(&members[1].http, "spin.localhost", "/spin?ms=1").0 == 200
    });
    // Fill a1's only slot, then ask a1 again: it forwards to the other home. (A probe sent
    // before the long request holds the slot is served by a1 itself; the next one is not.)
    let long = {
        let http = a1.http.clone();
        // The hop header keeps it on a1 even if a probe holds the slot at that moment.
        std::thread::spawn(move || {
            match http_request(
                &http,
                "GET",
                "spin.localhost",
                "/spin?ms=4000",
                &[("x-atoll-hop", "test")],
                b"",
            ) {
                Ok(response) => (
                    response.status,
                    response.header("x-atoll-node").unwrap_or_default().to_string(),
                ),
                Err(_) => (0, String::new()),
            }
        })
    };
    let mut probes = Vec::new();
    while !long.is_finished() {
        let probe = served_by_path(&a1.http, "spin.localhost", "/spin?ms=1");
        probes.push(probe.clone());
        if probe == (200, "a2".to_string()) {
            break;
        }
        std::thread::sleep(POLL);
    }
    assert_eq!(
        probes.last(),
        Some(&(200, "a2".to_string())),
        "probes while a1 was full: {probes:?}"
    );
    assert_eq!(long.join().unwrap(), (200, "a1".to_string()));
}

fn served_by_path(addr: &str, host: &str, path: &str) -> (u16, String) {
    match http_request(addr, "GET", host, path, &[], b"") {
        Ok(response) => (
            response.status,
            response.header("x-atoll-node").unwrap_or_default().to_string(),
        ),
        Err(_) => (0, String::new()),
    }
}

/// Whether the node with admin address `admin` has `peer` in its view, taking work.
fn knows(admin: &str, peer: &str) -> bool {
    let Ok(response) = http_get(admin, "admin", "/peers") else {
        return false;
    };
    let view: serde_json::Value = serde_json::from_slice(&response.body).unwrap_or_default();
    view["view_fresh"] == true
        && view["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["name"] == peer && p["draining"] == false && p["ejected"] == false)
}

/// Nodes a1 and a2 on region a's addresses, following the registry at `registry`, with
/// their data under `data` and `extra` flags.
fn region_a_members(registry: &str, data: &Path, extra: &[&str]) -> Vec<Member> {
    REGIONS[0]
        .1
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            let name = format!("a{}", i + 1);
            start_member(
                &["--registry", registry],
                &name,
                "a",
                ip,
                &data.join(&name),
                extra,
            )
        })
        .collect()
}

/// NATS, a registry, and a1 and a2 in region a following it, each function homed on one
/// of them; returns once each knows the other.
fn two_nodes() -> (NatsServer, Process, String, Vec<Member>, tempfile::TempDir) {
    let nats = NatsServer::start();
    let (registry, url) = start_nats_registry("registry", &nats);
    let data = tempfile::tempdir().unwrap();
    let members = region_a_members(&url, data.path(), &[]);
    wait_for_health(&url, &["a1", "a2"], "healthy");
    wait_until("a1 knows a2", || knows(&members[0].admin, "a2"));
    wait_until("a2 knows a1", || knows(&members[1].admin, "a1"));
    (nats, registry, url, members, data)
}

/// Pushes an `echo` named `name` on `NAME.localhost` whose GREETING is `greeting`.
fn push_echo(registry: &str, scratch: &Path, name: &str, greeting: &str) {
    let manifest = write_manifest(
        &scratch.join(format!("{name}-{greeting}")),
        name,
        &example_wasm("echo"),
        &[&format!("{name}.localhost")],
        &format!("[env]\nGREETING = {greeting:?}\n"),
    );
    push_ok(registry, &manifest);
}

/// `GET /` on `NAME.localhost` through `addr`: status, serving node and echo's GREETING.
fn greeting(addr: &str, name: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    match http_request(addr, "GET", &format!("{name}.localhost"), "/", headers, b"") {
        Ok(response) => (
            response.status,
            response.header("x-atoll-node").unwrap_or_default().to_string(),
            echo_fields(&response.text())
                .get("GREETING")
                .cloned()
                .unwrap_or_default(),
        ),
        Err(_) => (0, String::new(), String::new()),
    }
}

/// Two function names `PREFIX0`, `PREFIX1`, … whose one home in region a, of nodes a1 and
/// a2 (see [`two_nodes`]), is a2: a1 forwards them there.
fn homed_on_a2(prefix: &str) -> Vec<String> {
    let placement: Vec<atoll_router::cluster::placement::Member> = ["a1", "a2"]
        .iter()
        .map(|name| atoll_router::cluster::placement::Member {
            name: name.to_string(),
            region: "a".into(),
            in_flight: 0,
            draining: false,
        })
        .collect();
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .filter(|name| atoll_router::cluster::placement::home_nodes(name, "a", &placement, 1)[0].name == "a2")
        .take(2)
        .collect()
}

#[test]
fn a_lagging_peer_runs_nothing_and_the_request_is_served_where_it_arrived() {
    let (_nats, _registry, url, members, data) = two_nodes();
    let (a1, a2) = (&members[0], &members[1]);
    // Two functions homed on a2, so a1 forwards both there.
    let homed_on_a2 = homed_on_a2("lag");
    let (stale, missing) = (homed_on_a2[0].as_str(), homed_on_a2[1].as_str());
    let scratch = tempfile::tempdir().unwrap();
    let hop = [("x-atoll-hop", "test")];

    push_echo(&url, scratch.path(), stale, "v1");
    for member in &members {
        wait_until(&format!("{} serves {stale} v1", member.name), || {
            greeting(&member.http, stale, &hop) == (200, member.name.clone(), "v1".into())
        });
    }
    // a2 stops keeping up: it can no longer store a module, so it serves what it has.
    let modules = data.path().join("a2").join("modules");
    std::fs::remove_dir_all(&modules).unwrap();
    std::fs::write(&modules, "not a directory").unwrap();
    push_echo(&url, scratch.path(), stale, "v2");
    push_echo(&url, scratch.path(), missing, "v1");
    wait_until("a1 serves the new versions", || {
        greeting(&a1.http, stale, &hop) == (200, "a1".into(), "v2".into())
            && greeting(&a1.http, missing, &hop) == (200, "a1".into(), "v1".into())
    });
    assert_eq!(
        greeting(&a2.http, stale, &hop),
        (200, "a2".into(), "v1".into()),
        "a2 lags"
    );
    assert_ne!(greeting(&a2.http, missing, &hop).0, 200, "a2 lacks {missing}");
    assert!(knows(&a1.admin, "a2"), "a2 is a healthy peer all along");

    // a1 forwards to a2 (the home), which runs neither: a1 serves its own versions.
    let not_served = || {
        metric_value(
            &metrics(&a1.admin),
            "atoll_forwards_total",
            &[("outcome", "not_served")],
        )
        .unwrap_or(0.0)
    };
    let before = not_served();
    for _ in 0..5 {
        assert_eq!(
            greeting(&a1.http, missing, &[]),
            (200, "a1".into(), "v1".into()),
            "{missing}, which a2 does not have"
        );
        assert_eq!(
            greeting(&a1.http, stale, &[]),
            (200, "a1".into(), "v2".into()),
            "{stale}, of which a2 has v1"
        );
    }
    assert!(
        not_served() - before >= 10.0,
        "a1 did not forward to a2 (refused {} times)",
        not_served() - before
    );
}

#[test]
fn only_a_signed_hop_is_believed_about_the_client() {
    let (_nats, _registry, url, members, _data) = two_nodes();
    let a2 = &members[1];
    push_ok(&url, &example("echo"));
    let sha256 = parse_versions(&versions(&url, "echo"))
        .into_iter()
        .find(|row| row.active)
        .unwrap()
        .sha256;
    let hop = [("x-atoll-hop", "test")];
    wait_until("a2 serves echo", || {
        http_request(&a2.http, "GET", "echo.localhost", "/", &hop, b"").is_ok_and(|r| r.status == 200)
    });
    // Sent from a1's address, as a1 would forward it.
    let a1_ip: std::net::IpAddr = REGIONS[0].1[0].parse().unwrap();
    let ask = |headers: &[(&str, &str)]| {
        let response =
            http_request_from(a1_ip, &a2.http, "GET", "echo.localhost", "/p", headers, b"").unwrap();
        assert_eq!(response.status, 200, "{}", response.text());
        // Shown when an assertion below fails.
        println!("{headers:?} →\n{}", response.text());
        let fields = echo_fields(&response.text());
        assert!(
            fields.keys().all(|key| !key.starts_with("HTTP_X_ATOLL")),
            "hop headers reached the function: {fields:?}"
        );
        let scheme = fields["X_FULL_URL"].split("://").next().unwrap().to_string();
        (fields["REMOTE_ADDR"].clone(), scheme)
    };
    let hop_value = |key: &atoll_router::hop::ClusterKey, time: u64| {
        atoll_router::hop::HopClaims {
            node: "a1".into(),
            function: "echo".into(),
            version: 1,
            sha256: sha256.clone(),
            client: "192.0.2.1:1".parse().unwrap(),
            https: true,
            time,
        }
        .encode(
            Some(key),
            atoll_router::hop::Bound {
                method: "GET",
                host: "echo.localhost",
                target: "/p",
            },
        )
    };
    let cluster_key = atoll_router::hop::ClusterKey::from_token(TOKEN);
    let now = atoll_router::hop::now();
    let not_believed = ("127.0.0.11".to_string(), "http".to_string());

    // The old plain headers, from a peer's address.
    assert_eq!(
        ask(&[
            ("x-atoll-hop", "a1"),
            ("x-atoll-client", "192.0.2.1:1"),
            ("x-atoll-scheme", "https"),
        ]),
        not_believed
    );
    // Signed with another key, altered after signing, or too old.
    let other_key = atoll_router::hop::ClusterKey::from_token("not-the-cluster-token");
    assert_eq!(ask(&[("x-atoll-hop", &hop_value(&other_key, now))]), not_believed);
    let altered = hop_value(&cluster_key, now).replace("client=192.0.2.1:1", "client=192.0.2.9:1");
    assert_eq!(ask(&[("x-atoll-hop", &altered)]), not_believed);
    assert_eq!(
        ask(&[("x-atoll-hop", &hop_value(&cluster_key, now - 120))]),
        not_believed
    );
    // Signed with the cluster's key (derived from the token the nodes share): believed.
    assert_eq!(
        ask(&[("x-atoll-hop", &hop_value(&cluster_key, now))]),
        ("192.0.2.1".to_string(), "https".to_string())
    );
}

#[test]
fn a_short_or_unreadable_cluster_key_stops_the_node_with_a_clear_error() {
    let data = tempfile::tempdir().unwrap();
    let node = |key: &[&str]| {
        let mut args = vec!["node", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"];
        args.extend(["--data", data.path().to_str().unwrap()]);
        args.extend(key);
        let output = atoll(&args);
        assert!(!output.status.success(), "started with {key:?}");
        stderr(&output)
    };
    let error = node(&["--cluster-key", " short\n"]);
    assert!(
        error.contains("--cluster-key: the cluster key is 5 bytes; use at least 16"),
        "{error}"
    );
    let missing = data.path().join("no-such-key");
    let error = node(&["--cluster-key-file", missing.to_str().unwrap()]);
    assert!(
        error.contains("reading the cluster key file") && error.contains("no-such-key"),
        "{error}"
    );
}

#[test]
fn a_forwarded_large_response_is_relayed_and_a_broken_one_stays_broken() {
    let (_nats, _registry, url, members, data) = two_nodes();
    // Both functions homed on a2, so a1 forwards them there.
    let homed_on_a2 = homed_on_a2("bulk");
    let (big, stall) = (homed_on_a2[0].as_str(), homed_on_a2[1].as_str());
    let blocks = 256; // 16 MiB
    for (name, module, extra) in [
        (big, bulk_writer_module(blocks, ""), ""),
        (
            stall,
            bulk_writer_module(16, "(loop $forever (br $forever))"),
            "[limits]\ntimeout = \"2s\"\n",
        ),
    ] {
        let wasm = data.path().join(format!("{name}.wasm"));
        std::fs::write(&wasm, module).unwrap();
        let manifest = write_manifest(
            &data.path().join(name),
            name,
            &wasm,
            &[&format!("{name}.localhost")],
            extra,
        );
        push_ok(&url, &manifest);
    }
    let (a1, a2) = (&members[0], &members[1]);
    let out = data.path().join("out");
    let big_host = format!("{big}.localhost");
    let stall_host = format!("{stall}.localhost");
    // Served by a2 itself before a1 is asked, so a1's forward finds it there.
    for host in [&big_host, &stall_host] {
        wait_until(&format!("a2 serves {host}"), || {
            download(&a2.http, host, &out, &["-H", "x-atoll-hop: test"]).status == 200
        });
    }
    wait_until("a1 serves it (forwarding to a2)", || {
        download(&a1.http, &big_host, &out, &[]).status == 200
    });
    let size = blocks as u64 * 64 * 1024;
    let forwarded = download(&a1.http, &big_host, &out, &[]);
    assert_eq!(
        (
            forwarded.exit,
            forwarded.status,
            forwarded.size,
            forwarded.served_by()
        ),
        (0, 200, size, "a2")
    );
    // Relayed as it came, not collected first: no length up front.
    assert!(
        forwarded.headers.contains("transfer-encoding: chunked"),
        "{}",
        forwarded.headers
    );
    // A body that broke off at the home node is not completed by the forwarding one.
    let broken = download(&a1.http, &stall_host, &out, &[]);
    assert_eq!((broken.status, broken.served_by()), (200, "a2"));
    assert!(broken.size >= 1 << 20, "only {} bytes", broken.size);
    assert_ne!(broken.exit, 0, "a cut-off body looked complete after the forward");
}
