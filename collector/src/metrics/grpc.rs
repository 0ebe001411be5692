//! gRPC call metrics: a tower layer around the collector's whole gRPC server that counts each
//! call (`census_collector_grpc_requests_total`) and times it to its response headers
//! (`census_collector_grpc_request_seconds`), labelled by service and method. For unary calls
//! (GetCounts, ListDevices, ...) that is the whole call; for the Report stream it is only its
//! opening, which is why batches have metrics of their own.
//!
//! Labels come only from the methods the collector serves (read from the services' descriptor
//! sets), never from the request as such: a client sending made-up paths cannot create new
//! series; those count as `other`.

use std::{
    collections::HashSet,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use tonic::codegen::http;

use super::Metrics;

/// The `/package.Service/Method` paths the collector serves.
fn known_paths() -> HashSet<String> {
    use prost::Message as _;
    let mut out = HashSet::new();
    for set in [
        census_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ] {
        let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
            continue;
        };
        for file in set.file {
            for service in &file.service {
                for method in &service.method {
                    out.insert(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
    }
    out
}

/// The layer: `Server::builder().layer(GrpcMetricsLayer::new(metrics))`.
#[derive(Debug, Clone)]
pub struct GrpcMetricsLayer {
    metrics: Arc<Metrics>,
    known: Arc<HashSet<String>>,
}

impl GrpcMetricsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        GrpcMetricsLayer {
            metrics,
            known: Arc::new(known_paths()),
        }
    }

    /// The (service, method) labels of a request path.
    fn labels(&self, path: &str) -> (String, String) {
        if self.known.contains(path)
            && let Some((service, method)) = path.trim_start_matches('/').split_once('/')
        {
            return (service.to_owned(), method.to_owned());
        }
        ("other".to_owned(), "other".to_owned())
    }
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`GrpcMetricsLayer`] wraps the server's routes in.
#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    layer: GrpcMetricsLayer,
}

impl<S, B, R> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (service, method) = self.layer.labels(request.uri().path());
        let metrics = Arc::clone(&self.layer.metrics);
        metrics
            .grpc_requests
            .with_label_values(&[&service, &method])
            .inc();
        let started = Instant::now();
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await;
            metrics
                .grpc_seconds
                .with_label_values(&[&service, &method])
                .observe(started.elapsed().as_secs_f64());
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_served_methods_become_labels() {
        let layer = GrpcMetricsLayer::new(Metrics::new(None));
        assert_eq!(
            layer.labels("/census.v1.QueryService/GetCounts"),
            ("census.v1.QueryService".to_owned(), "GetCounts".to_owned())
        );
        assert_eq!(
            layer.labels("/census.v1.IngestService/Report"),
            ("census.v1.IngestService".to_owned(), "Report".to_owned())
        );
        assert_eq!(
            layer.labels("/grpc.health.v1.Health/Check"),
            ("grpc.health.v1.Health".to_owned(), "Check".to_owned())
        );
        for made_up in ["/census.v1.QueryService/Nope", "/x/y", "/", ""] {
            assert_eq!(
                layer.labels(made_up),
                ("other".to_owned(), "other".to_owned()),
                "{made_up}"
            );
        }
    }
}
