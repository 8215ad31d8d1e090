#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, UNIX_EPOCH};

use clap::Parser;

use super::*;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    a: ObserveArgs,
}

fn args(line: &str) -> Result<ObserveArgs, clap::Error> {
    Cli::try_parse_from(std::iter::once("observe").chain(line.split_whitespace())).map(|c| c.a)
}

fn filter(line: &str) -> Filter {
    args(line).unwrap().filter(now()).unwrap()
}

fn now() -> SystemTime {
    // 2026-12-07T08:00:00Z
    UNIX_EPOCH + Duration::from_secs(1_796_630_400)
}

fn event(json: &str) -> Flow {
    Flow::new("n1", serde_json::from_str(json).unwrap())
}

/// A drop at egress of production/frontend to production/postgres-0:5432, 07:59:00.
fn drop_flow() -> Flow {
    event(concat!(
        r#"{"type":"drop","time":"2026-12-07T07:59:00.000Z","verdict":"denied","#,
        r#""reason":"policy_default_deny","direction":"egress","protocol":6,"#,
        r#""source":{"ip":"10.0.1.5","port":40000,"identity":300,"pod":"production/frontend-7d9"},"#,
        r#""destination":{"ip":"10.0.1.9","port":5432,"identity":301,"pod":"production/postgres-0"},"#,
        r#""ifindex":4,"cookie":0,"policy":null,"#,
        r#""explanation":"egress of production/frontend-7d9: denied at L3: default deny: selected by NetworkPolicy production/default-deny-all and no rule allows TCP/5432 to identity 301 (Pod)"}"#
    ))
}

/// An HTTP request from production/frontend to production/api, allowed, 07:58:00.
fn http_flow(verdict: &str, method: &str, path: &str) -> Flow {
    event(&format!(
        concat!(
            r#"{{"type":"http","Timestamp":"2026-12-07T07:58:00.000000001Z","ObservationPoint":"Ingress","#,
            r#""Verdict":"{}","SourceEndpoint":{{"IP":"10.0.1.5","Port":40001,"Identity":300,"Pod":"production/frontend-7d9"}},"#,
            r#""DestinationEndpoint":{{"IP":"10.0.1.7","Port":8080,"Identity":302,"Pod":"production/api-5f6"}},"#,
            r#""HTTP":{{"Code":200,"Scheme":"http","Method":"{}","Host":"api","Path":"{}","Protocol":"HTTP/1.1"}},"#,
            r#""LatencyNs":5,"PolicyGeneration":2,"#,
            r#""AllowedBy":[{{"Direction":"ingress","Policy":"CiliumNetworkPolicy production/api-l7","Rule":"spec.ingress[0].toPorts[0].rules.http[0]"}}]}}"#
        ),
        verdict, method, path
    ))
}

/// A TLS session of production/payments reset for its SNI (no request), 07:56:00.
fn tls_session() -> Flow {
    event(concat!(
        r#"{"type":"http","Timestamp":"2026-12-07T07:56:00.000000001Z","ObservationPoint":"Egress","#,
        r#""Verdict":"Denied","SourceEndpoint":{"IP":"10.0.1.8","Port":40002,"Identity":303,"Pod":"production/payments"},"#,
        r#""DestinationEndpoint":{"IP":"203.0.113.20","Port":443,"Identity":2},"#,
        r#""TLS":{"SNI":"evil.example","Mode":"reset"},"LatencyNs":5,"PolicyGeneration":2,"#,
        r#""Info":"no serverNames rule matches"}"#
    ))
}

/// A DNS query of production/payments, refused, 07:57:00.
fn dns_flow() -> Flow {
    event(concat!(
        r#"{"type":"dns","time":"2026-12-07T07:57:00.000001Z","source":"production/payments","#,
        r#""client":"10.0.1.8:5353","server":"10.96.0.10:53","transport":"udp","#,
        r#""qname":"evil.example.","qtype":"A","verdict":"denied","rcode":"Refused","#,
        r#""reason":"no DNS rule matches","latency_us":3}"#
    ))
}

fn type_name(f: &Flow) -> &'static str {
    match &f.event {
        Event::Drop(_) => "drop",
        Event::Http(_) => "http",
        Event::Dns(_) => "dns",
        _ => "note",
    }
}

fn all() -> Vec<Flow> {
    vec![
        drop_flow(),
        http_flow("Forwarded", "GET", "/v1/products"),
        dns_flow(),
    ]
}

/// The types of the flows that pass `line`'s filters.
fn kept(line: &str) -> Vec<&'static str> {
    let f = filter(line);
    all()
        .iter()
        .filter(|x| f.matches(x))
        .map(|x| type_name(x))
        .collect()
}

#[test]
fn hubble_verdicts_and_ward_names_parse_to_one_verdict() {
    for (v, want) in [
        ("DROPPED", Verdict::Dropped),
        ("dropped", Verdict::Dropped),
        ("denied", Verdict::Dropped),
        ("DENIED", Verdict::Dropped),
        ("FORWARDED", Verdict::Forwarded),
        ("forwarded", Verdict::Forwarded),
        ("ERROR", Verdict::Error),
        ("error", Verdict::Error),
        ("AUDIT", Verdict::Audit),
    ] {
        assert_eq!(
            args(&format!("--verdict {v}")).unwrap().verdict,
            vec![want],
            "{v}"
        );
    }
    let err = args("--verdict REJECTED").unwrap_err().to_string();
    assert!(
        err.contains("REJECTED") && err.contains("DROPPED") && err.contains("FORWARDED"),
        "{err}"
    );
}

#[test]
fn bad_values_are_errors_naming_the_flag() {
    for (line, words) in [
        ("--type flows", vec!["flows", "l7", "drop"]),
        ("--protocol gopher", vec!["gopher", "tcp"]),
        ("--port 70000", vec!["70000", "--port"]),
        ("-o yaml", vec!["yaml", "jsonpb"]),
        ("--last many", vec!["many", "--last"]),
    ] {
        let err = args(line).unwrap_err().to_string();
        for w in words {
            assert!(err.contains(w), "{line}: {w} not in {err}");
        }
    }
    for (line, words) in [
        ("--http-path (", vec!["--http-path", "regular expression"]),
        ("--since yesterday", vec!["--since", "5m", "RFC 3339"]),
        ("--from-pod a/b/c", vec!["--from-pod", "NAMESPACE/POD"]),
    ] {
        let err = format!("{:#}", args(line).unwrap().filter(now()).unwrap_err());
        for w in words {
            assert!(err.contains(w), "{line}: {w} not in {err}");
        }
    }
}

#[test]
fn pods_and_namespaces_match_either_side_or_one_side() {
    assert_eq!(kept("--pod production/postgres-0"), vec!["drop"]);
    // a prefix, as Hubble's: the deployment's name matches its pods
    assert_eq!(kept("--pod production/frontend"), vec!["drop", "http"]);
    assert_eq!(kept("--from-pod production/frontend"), vec!["drop", "http"]);
    assert_eq!(kept("--to-pod production/frontend"), Vec::<&str>::new());
    assert_eq!(
        kept("--from-pod production/frontend --to-pod production/postgres"),
        vec!["drop"]
    );
    // a bare pod is in the one --namespace given (else `default`)
    assert_eq!(kept("--pod api -n production"), vec!["http"]);
    assert_eq!(kept("--pod api"), Vec::<&str>::new());
    assert_eq!(kept("--namespace production"), vec!["drop", "http", "dns"]);
    assert_eq!(kept("--namespace analytics"), Vec::<&str>::new());
    assert_eq!(
        kept("--from-namespace production"),
        vec!["drop", "http", "dns"]
    );
    // the DNS server is an address, not a pod
    assert_eq!(kept("--to-namespace production"), vec!["drop", "http"]);
    // values of one flag are alternatives
    assert_eq!(
        kept("--pod production/api --pod production/payments"),
        vec!["http", "dns"]
    );
}

#[test]
fn verdict_type_protocol_port_and_http_filters() {
    assert_eq!(kept("--verdict DROPPED"), vec!["drop", "dns"]);
    assert_eq!(kept("--verdict denied"), vec!["drop", "dns"]);
    assert_eq!(kept("--verdict FORWARDED"), vec!["http"]);
    assert_eq!(kept("--verdict AUDIT"), Vec::<&str>::new());
    assert_eq!(kept("--type l7"), vec!["http", "dns"]);
    assert_eq!(kept("--type drop"), vec!["drop"]);
    assert_eq!(kept("--type dns"), vec!["dns"]);
    assert_eq!(kept("--type tls"), Vec::<&str>::new());
    assert_eq!(kept("--protocol TCP"), vec!["drop", "http"]);
    assert_eq!(kept("--protocol udp"), vec!["dns"]);
    assert_eq!(kept("--protocol http"), vec!["http"]);
    assert_eq!(kept("--port 5432"), vec!["drop"]);
    assert_eq!(kept("--port 53"), vec!["dns"]);
    assert_eq!(kept("--to-port 8080"), vec!["http"]);
    assert_eq!(kept("--from-port 8080"), Vec::<&str>::new());
    assert_eq!(kept("--http-method get"), vec!["http"]);
    assert_eq!(kept("--http-method POST"), Vec::<&str>::new());
    assert_eq!(kept("--http-path ^/v1/prod"), vec!["http"]);
    assert_eq!(kept("--http-path products$"), vec!["http"]);
    assert_eq!(kept("--http-path ^/admin"), Vec::<&str>::new());
    assert_eq!(kept("--ip 10.96.0.10"), vec!["dns"]);
    assert_eq!(kept("--to-ip 10.0.1.9"), vec!["drop"]);
    assert_eq!(kept("--node-name n1"), vec!["drop", "http", "dns"]);
    assert_eq!(kept("--node-name n2"), Vec::<&str>::new());
    assert_eq!(
        kept("--verdict DROPPED --namespace production --type drop"),
        vec!["drop"]
    );
}

#[test]
fn since_and_until_take_durations_and_times() {
    // now is 08:00: the drop is 1 min old, the HTTP request 2, the DNS query 3
    assert_eq!(kept("--since 90s"), vec!["drop"]);
    assert_eq!(kept("--since 2m30s"), vec!["drop", "http"]);
    assert_eq!(kept("--since 2026-12-07T07:57:30Z"), vec!["drop", "http"]);
    assert_eq!(kept("--until 2026-12-07T07:58:30Z"), vec!["http", "dns"]);
    assert_eq!(kept("--since 5m --until 90s"), vec!["http", "dns"]);
}

#[test]
fn several_agents_merge_by_time_and_last_takes_the_newest() {
    let mut flows = all();
    flows[2].node = "n2".into();
    filter::by_time(&mut flows);
    let order: Vec<&str> = flows.iter().map(|f| type_name(f)).collect();
    assert_eq!(order, vec!["dns", "http", "drop"]);
    let last = filter::last(flows.clone(), Some(2));
    assert_eq!(
        last.iter().map(|f| type_name(f)).collect::<Vec<_>>(),
        vec!["http", "drop"]
    );
    assert_eq!(filter::last(flows, Some(10)).len(), 3);
}

#[test]
fn targets_pair_netns_and_admin_addresses() {
    let a: SocketAddr = "127.0.0.1:9890".parse().unwrap();
    let b: SocketAddr = "127.0.0.1:9891".parse().unwrap();
    assert_eq!(
        targets(&[], &[]).unwrap(),
        vec![Target {
            admin: a,
            netns: None
        }]
    );
    let t = targets(&[], &["n1".into(), "/proc/1/ns/net".into()]).unwrap();
    assert_eq!(t[0].netns, Some(PathBuf::from("/var/run/netns/n1")));
    assert_eq!(t[1].netns, Some(PathBuf::from("/proc/1/ns/net")));
    assert!(t.iter().all(|t| t.admin == a));
    let t = targets(&[a, b], &["n1".into(), "n2".into()]).unwrap();
    assert_eq!(t[1].admin, b);
    assert_eq!(targets(&[a, b], &[]).unwrap().len(), 2);
    let err = targets(&[a, b], &["n1".into(), "n2".into(), "n3".into()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("3 --netns and 2 --admin"), "{err}");
}

#[test]
fn a_drop_line_names_the_policy_decision() {
    let line = render::compact(&drop_flow());
    assert_eq!(
        line,
        "2026-12-07T07:59:00.000Z [n1]: production/frontend-7d9:40000 (ID:300) -> \
         production/postgres-0:5432 (ID:301) drop DROPPED (TCP, policy_default_deny, egress): \
         egress of production/frontend-7d9: denied at L3: default deny: selected by \
         NetworkPolicy production/default-deny-all and no rule allows TCP/5432 to identity 301 (Pod)"
    );
    let line = render::compact(&http_flow("Denied", "DELETE", "/admin"));
    assert!(
        line.contains("http-request DROPPED (HTTP/1.1 DELETE http://api/admin => 200)"),
        "{line}"
    );
    let line = render::compact(&dns_flow());
    assert!(
        line.ends_with(
            "dns-request DROPPED (DNS Query evil.example. A => Refused): no DNS rule matches"
        ),
        "{line}"
    );
}

#[test]
fn tls_sessions_are_the_tls_type_and_print_their_sni() {
    let mut flows = all();
    flows.push(tls_session());
    let f = filter("--type tls");
    let kept: Vec<&Flow> = flows.iter().filter(|x| f.matches(x)).collect();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0], &tls_session());
    assert!(filter("--verdict DROPPED --pod production/payments").matches(&tls_session()));
    assert!(
        !filter("--http-method GET").matches(&tls_session()),
        "no request"
    );
    let line = render::compact(&tls_session());
    assert!(
        line.ends_with(
            "tls-session DROPPED (TLS SNI evil.example reset): no serverNames rule matches"
        ),
        "{line}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&render::jsonpb(&tls_session()).unwrap()).unwrap();
    assert_eq!(v["flow"]["Type"], "L7");
    assert!(v["flow"]["l7"].get("http").is_none(), "{v}");
}

#[test]
fn the_table_aligns_its_columns() {
    let flows = all();
    let mut t = Table::default();
    t.fit(&flows);
    let header = t.header();
    let lines: Vec<String> = flows.iter().map(|f| t.line(f)).collect();
    let col = |s: &str, word: &str| s.find(word).unwrap();
    let at = col(&header, "VERDICT");
    assert_eq!(col(&lines[0], "DROPPED"), at, "{header}\n{}", lines[0]);
    assert_eq!(col(&lines[1], "FORWARDED"), at, "{header}\n{}", lines[1]);
    assert!(header.starts_with("TIMESTAMP"));
}

#[test]
fn jsonpb_has_hubble_s_flow_shape() {
    let v: serde_json::Value =
        serde_json::from_str(&render::jsonpb(&drop_flow()).unwrap()).unwrap();
    let f = &v["flow"];
    assert_eq!(f["verdict"], "DROPPED");
    assert_eq!(f["Type"], "L3_L4");
    assert_eq!(f["IP"]["destination"], "10.0.1.9");
    assert_eq!(f["l4"]["TCP"]["destination_port"], 5432);
    assert_eq!(f["source"]["namespace"], "production");
    assert_eq!(f["source"]["pod_name"], "frontend-7d9");
    assert_eq!(f["traffic_direction"], "EGRESS");
    assert_eq!(f["drop_reason_desc"], "POLICY_DEFAULT_DENY");
    assert!(f["Summary"].as_str().unwrap().contains("default deny"));
    assert_eq!(v["node_name"], "n1");

    let v: serde_json::Value =
        serde_json::from_str(&render::jsonpb(&http_flow("Forwarded", "GET", "/v1/x")).unwrap())
            .unwrap();
    let f = &v["flow"];
    assert_eq!(f["Type"], "L7");
    assert_eq!(f["l7"]["http"]["url"], "http://api/v1/x");
    assert_eq!(f["l7"]["http"]["method"], "GET");
    assert_eq!(
        f["ingress_allowed_by"][0],
        serde_json::json!({"kind": "CiliumNetworkPolicy", "namespace": "production", "name": "api-l7"})
    );

    let v: serde_json::Value = serde_json::from_str(&render::jsonpb(&dns_flow()).unwrap()).unwrap();
    assert_eq!(v["flow"]["l7"]["dns"]["query"], "evil.example.");
    assert_eq!(v["flow"]["l7"]["dns"]["rcode"], "Refused");
}

#[test]
fn json_is_the_agent_s_record_with_its_node() {
    let line = render::json(&drop_flow()).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["type"], "drop");
    assert_eq!(v["node"], "n1");
    let back: Event = serde_json::from_str(&line).unwrap();
    assert_eq!(back, drop_flow().event);
}
