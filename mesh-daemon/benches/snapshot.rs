//! How long a configuration change takes to apply: the whole snapshot (services, endpoints,
//! routing) is rebuilt from the objects on every change, so this is the cost of editing one
//! resource in a cluster of 10,000 Services and 1,000 VirtualServices.
use std::fmt::Write as _;

use criterion::{Criterion, criterion_group, criterion_main};
use mesh_daemon::{config::objects::Objects, state::Snapshot};

const SERVICES: usize = 10_000;
const VIRTUAL_SERVICES: usize = 1_000;
const NAMESPACES: usize = 50;

fn cluster() -> Objects {
    let mut yaml = String::new();
    for n in 0..NAMESPACES {
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ns{n}, labels: {{istio-injection: enabled}}}}\n"
        );
    }
    for i in 0..SERVICES {
        let ns = i % NAMESPACES;
        let (a, b) = (i / 250, i % 250);
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc{i}, namespace: ns{ns}}}\n\
             spec: {{clusterIP: 10.96.{a}.{b}, ports: [{{name: http, port: 80}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: svc{i}-x, namespace: ns{ns}, labels: {{kubernetes.io/service-name: svc{i}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
             endpoints: [{{addresses: [10.1.{a}.{b}]}}, {{addresses: [10.2.{a}.{b}]}}, {{addresses: [10.3.{a}.{b}]}}]\n"
        );
    }
    for i in 0..VIRTUAL_SERVICES {
        let ns = i % NAMESPACES;
        let _ = write!(
            yaml,
            "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: vs{i}, namespace: ns{ns}}}\n\
             spec:\n  hosts: [svc{i}]\n  http:\n  - match: [{{uri: {{prefix: /api}}}}, {{headers: {{x-canary: {{exact: \"true\"}}}}}}]\n    \
             route: [{{destination: {{host: svc{i}, subset: v1}}, weight: 90}}, {{destination: {{host: svc{i}, subset: v2}}, weight: 10}}]\n  \
             - route: [{{destination: {{host: svc{i}, subset: v1}}}}]\n\
             ---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: dr{i}, namespace: ns{ns}}}\n\
             spec: {{host: svc{i}, subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]}}\n"
        );
    }
    let mut o = Objects::default();
    o.add_text("bench.yaml", &yaml);
    assert!(o.errors.is_empty(), "{:?}", o.errors.first());
    o
}

fn bench(c: &mut Criterion) {
    let objects = cluster();
    let mut g = c.benchmark_group("snapshot");
    g.sample_size(10);
    g.bench_function("compile 10k services, 1k virtual services", |b| {
        b.iter(|| Snapshot::compile(&objects, "cluster.local", "istio-system", 1))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
