//! Cog's HTTP prediction API over a runner [`Engine`]: the synchronous core.
//!
//! Status codes and bodies follow Cog 0.23.1's server (coglet): 200 with the prediction
//! (also for failed predictions: failure is data), 422 with `detail` for invalid input,
//! 409 when every slot is busy, 503 before setup has succeeded, and axum's plain-text
//! 400/415/422 for bodies that are not a JSON prediction request.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use runner_engine::{new_prediction_id, Engine, Health, Prediction, PredictionStatus, Rejection};
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

pub const RUNNER_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The routes, ready to serve.
pub fn router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/health-check", get(health_check))
        .route("/openapi.json", get(openapi))
        .route("/predictions", post(create_prediction))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(engine)
}

async fn root() -> Json<Value> {
    Json(json!({
        "cog_version": runner_spec::COG_VERSION,
        "runner_version": RUNNER_VERSION,
        "openapi_url": "/openapi.json",
        "healthcheck_url": "/health-check",
        "predictions_url": "/predictions",
    }))
}

async fn health_check(State(engine): State<Arc<Engine>>) -> Json<Value> {
    let (health, setup) = engine.health();
    let mut body = json!({
        "status": health,
        "setup": setup,
        "version": {"runner": RUNNER_VERSION, "cog": runner_spec::COG_VERSION},
    });
    if let Some(loaded) = engine.loaded() {
        body["runner"] = json!({
            "model": engine.model_name(),
            "architecture": format!("candle:{}", engine.architecture()),
            "device": loaded.device,
            "weights_source": loaded.weights_source,
            "setup_time": loaded.setup_time.as_secs_f64(),
            "slots": engine.total_slots(),
        });
    }
    Json(body)
}

async fn openapi(State(engine): State<Arc<Engine>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        engine.openapi_json().to_string(),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct PredictionRequest {
    id: Option<String>,
    #[serde(default)]
    input: Value,
    webhook: Option<String>,
}

async fn create_prediction(
    State(engine): State<Arc<Engine>>,
    body: Option<Json<PredictionRequest>>,
) -> Response {
    let request = body.map(|Json(r)| r).unwrap_or(PredictionRequest {
        id: None,
        input: Value::Null,
        webhook: None,
    });
    // Cog treats a missing or null input as an empty one.
    let input = if request.input.is_null() {
        Value::Object(Map::new())
    } else {
        request.input
    };
    if request.webhook.is_some() {
        tracing::warn!("webhooks are not delivered yet: answering synchronously");
    }
    let id = request.id.unwrap_or_else(new_prediction_id);
    match engine.predict(id, &input).await {
        Ok(prediction) => (StatusCode::OK, Json(prediction_body(&prediction))).into_response(),
        Err(rejection) => rejection_response(rejection),
    }
}

/// The body of a finished synchronous prediction, as Cog's server writes it.
pub fn prediction_body(p: &Prediction) -> Value {
    let mut body = Map::new();
    body.insert("id".into(), json!(p.id));
    if let Some(error) = &p.error {
        body.insert("error".into(), json!(error));
    }
    body.insert("logs".into(), json!(p.logs));
    body.insert(
        "metrics".into(),
        json!({"predict_time": p.predict_time.as_secs_f64()}),
    );
    if p.status == PredictionStatus::Succeeded {
        body.insert("output".into(), p.output.clone());
    }
    body.insert("status".into(), json!(p.status));
    Value::Object(body)
}

/// One place maps engine rejections to Cog's status codes.
pub fn rejection_response(rejection: Rejection) -> Response {
    match rejection {
        Rejection::InvalidInput(issues) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"detail": issues.iter().map(|i| i.to_json()).collect::<Vec<_>>()})),
        )
            .into_response(),
        Rejection::AtCapacity => (
            StatusCode::CONFLICT,
            Json(json!({"error": "At capacity - all prediction slots busy", "status": "failed"})),
        )
            .into_response(),
        Rejection::NotReady { setup_failed } => {
            let error = if setup_failed {
                "Setup failed: the model could not be loaded. GET /health-check for the setup logs."
            } else {
                "Setup has not finished yet. Wait until it has finished, or GET /health-check for status."
            };
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": error, "status": "failed"})),
            )
                .into_response()
        }
    }
}

/// Whether the engine is serving (for a ready line or a wait loop).
pub fn is_ready(engine: &Engine) -> bool {
    matches!(engine.health().0, Health::Ready | Health::Busy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use runner_models::DeviceSpec;
    use runner_spec::ModelDir;
    use tower::ServiceExt;

    async fn engine(setup: bool) -> (tempfile::TempDir, Arc<Engine>) {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("cog.yaml"), "run: candle:conformance\n").unwrap();
        let engine = Engine::new(ModelDir::open(d.path()).unwrap(), DeviceSpec::Cpu, None).unwrap();
        if setup {
            engine.setup().await.unwrap();
        }
        (d, engine)
    }

    async fn call(engine: &Arc<Engine>, req: Request<Body>) -> (StatusCode, String) {
        let res = router(Arc::clone(engine)).oneshot(req).await.unwrap();
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    fn post(body: &str) -> Request<Body> {
        Request::post("/predictions")
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap()
    }

    #[tokio::test]
    async fn predictions_and_errors() {
        let (_d, engine) = engine(true).await;
        let (status, body) = call(
            &engine,
            post(r#"{"id": "p1", "input": {"text": "hi", "extra": 1}}"#),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["id"], "p1");
        assert_eq!(v["status"], "succeeded");
        assert_eq!(v["output"]["text"], "hihihi");
        assert!(v["metrics"]["predict_time"].as_f64().unwrap() >= 0.0);
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["id", "logs", "metrics", "output", "status"]);

        let (status, body) =
            call(&engine, post(r#"{"input": {"text": "", "color": "pink"}}"#)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["detail"].as_array().unwrap().len(), 2, "{body}");
        assert_eq!(v["detail"][0]["loc"][0], "body");

        let (status, body) = call(&engine, post(r#"{"input": {"text": "x", "fail": true}}"#)).await;
        assert_eq!(status, StatusCode::OK);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "failed");
        assert!(v["error"].as_str().unwrap().contains("on purpose"));

        let (status, _) = call(&engine, post("{not json")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, _) = call(
            &engine,
            Request::post("/predictions")
                .header("content-type", "text/plain")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let (status, _) = call(&engine, post(r#"{"id": 5}"#)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        // No body at all: an empty input, so the required `text` is reported missing.
        let (status, body) = call(
            &engine,
            Request::post("/predictions").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert!(body.contains("Field required"));
    }

    #[tokio::test]
    async fn not_ready_and_health() {
        let (_d, engine) = engine(false).await;
        let (status, body) = call(
            &engine,
            Request::get("/health-check").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("\"STARTING\""), "{body}");
        let (status, _) = call(&engine, post(r#"{"input": {"text": "x"}}"#)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let (status, body) = call(
            &engine,
            Request::get("/openapi.json").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, engine.openapi_json());
        let (_, body) = call(&engine, Request::get("/").body(Body::empty()).unwrap()).await;
        assert!(body.contains("predictions_url"));
    }

    #[tokio::test]
    async fn busy_is_409() {
        let (_d, engine) = engine(true).await;
        let slow = {
            let e = Arc::clone(&engine);
            tokio::spawn(async move {
                call(&e, post(r#"{"input": {"text": "x", "sleep": 0.5}}"#)).await
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        let (_, body) = call(
            &engine,
            Request::get("/health-check").body(Body::empty()).unwrap(),
        )
        .await;
        assert!(body.contains("\"BUSY\""), "{body}");
        let (status, body) = call(&engine, post(r#"{"input": {"text": "x"}}"#)).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert_eq!(slow.await.unwrap().0, StatusCode::OK);
    }
}
