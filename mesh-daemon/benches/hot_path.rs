//! What each request pays in the proxy before any byte moves: route matching (a
//! VirtualService of 1,000 routes, first and last route matching), endpoint choice (each
//! load-balancing policy over 100 endpoints), and the snapshot lookups (VIP to Service,
//! VirtualService for a host, the cluster with its endpoints and merged policy).
use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr, sync::Arc};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use mesh_daemon::{
    config::objects::Objects,
    proxy::cluster_state::{Choice, ClusterState, hash_key},
    routing::{
        eval::RequestView,
        policy::{HashKey, LbPolicy},
    },
    state::Snapshot,
};

const ROUTES: usize = 1_000;
const HOST: &str = "api.bench.svc.cluster.local";

/// One Service with 100 endpoints and a VirtualService of 1,000 routes, each matching a
/// prefix and a header, the last one a catch-all.
fn objects() -> Objects {
    let mut y = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: bench, labels: {istio-injection: enabled}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: bench}\n\
         spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: api-x, namespace: bench, labels: {kubernetes.io/service-name: api}}\n\
         addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n",
    );
    for i in 0..100 {
        let _ = writeln!(y, "- addresses: [10.1.0.{i}]");
    }
    y.push_str(
        "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\n\
         metadata: {name: api, namespace: bench}\nspec:\n  hosts: [api]\n  http:\n",
    );
    for i in 0..ROUTES - 1 {
        let _ = write!(
            y,
            "  - match: [{{uri: {{prefix: /r{i}/}}, headers: {{x-tenant: {{exact: t{i}}}}}}}]\n    \
             route: [{{destination: {{host: api}}}}]\n"
        );
    }
    y.push_str("  - route: [{destination: {host: api}}]\n");
    let mut o = Objects::default();
    o.add_text("bench.yaml", &y);
    assert!(o.errors.is_empty(), "{:?}", o.errors.first());
    o
}

fn bench(c: &mut Criterion) {
    let snap = Snapshot::compile(&objects(), "cluster.local", "istio-system", 1);
    let vh = snap
        .routing
        .virtual_host("bench", HOST, 80)
        .expect("virtual host");
    let labels = BTreeMap::new();
    let mut headers = http::HeaderMap::new();
    headers.insert("x-tenant", http::HeaderValue::from_static("t0"));
    let view = |path: &'static str| RequestView {
        path,
        query: None,
        method: "GET",
        scheme: "http",
        authority: "api",
        headers: &headers,
        port: 80,
        source_labels: &labels,
        source_namespace: "bench",
    };
    let mut g = c.benchmark_group("route match, 1,000 routes");
    let first = view("/r0/x");
    g.bench_function("first route", |b| b.iter(|| vh.select(&first).is_some()));
    let last = view("/none");
    g.bench_function("catch-all after 999 misses", |b| {
        b.iter(|| vh.select(&last).is_some())
    });
    g.finish();

    let mut g = c.benchmark_group("snapshot lookup");
    let vip: SocketAddr = SocketAddr::from(([10, 96, 0, 10], 80));
    g.bench_function("service by VIP", |b| {
        b.iter(|| snap.service(&vip).is_some())
    });
    g.bench_function("virtual host", |b| {
        b.iter(|| snap.routing.virtual_host("bench", HOST, 80).is_some())
    });
    g.bench_function("cluster with endpoints and policy", |b| {
        b.iter(|| snap.routing.cluster("bench", HOST, 80, None).is_some())
    });
    g.finish();

    let mut cluster = (*snap
        .routing
        .cluster("bench", HOST, 80, None)
        .expect("cluster"))
    .clone();
    let mut g = c.benchmark_group("endpoint choice, 100 endpoints");
    let policies = [
        ("round robin", LbPolicy::RoundRobin),
        ("least request", LbPolicy::LeastRequest),
        ("random", LbPolicy::Random),
        (
            "consistent hash",
            LbPolicy::Hash(HashKey::Header("x".into())),
        ),
    ];
    for (name, lb) in policies {
        cluster.policy.lb = lb;
        let state = Arc::new(ClusterState::default());
        let key = hash_key(b"user-42");
        g.bench_with_input(BenchmarkId::from_parameter(name), &cluster, |b, cl| {
            b.iter(|| {
                let choice = Choice {
                    v4: true,
                    hash: Some(key),
                    tried: &[],
                };
                state.choose(cl, &choice).map(|(a, _)| a)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
