--
-- errors: every family of the error model (README, "Errors"), with its
-- SQLSTATE, message, DETAIL and HINT.  Faults make the sandbox answer badly
-- once.  Nothing is recorded by a failed call.
--
\! test/sandbox/ctl POST reset
CREATE FUNCTION t_authorize_err() RETURNS text LANGUAGE sql AS $$
    SELECT t_err($q$SELECT * FROM digime.digime_authorize_url('yrg1LktWk2gldVk8atD5Pf7Um4c1LnMs',
                                                       'https://app.example/return', 'errors')$q$)
$$;
-- API errors: digi.me's code, message, reference and the HTTP status in DETAIL
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"error","status":401,"code":"InvalidToken","message":"The token (access_token) is invalid","reference":"ref00000000000000000000000000001"}'
SELECT t_authorize_err();
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"error","status":401,"code":"InvalidClient","message":"The client_id (x) is invalid","reference":"ref00000000000000000000000000002"}'
SELECT t_authorize_err();
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"error","status":404,"code":"InvalidRedirectUri","message":"The redirect_uri (https://app.example/return) is invalid","reference":"3Wb9vDEsv4ODYKaoP6lQKCbZu9rnJ6UH"}'
SELECT t_authorize_err();
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"error","status":403,"code":"InsufficientScope","message":"The request requires higher privileges than provided by the access token","reference":"ref00000000000000000000000000004"}'
SELECT t_authorize_err();
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"error","status":400,"code":"SDKInvalid","message":"The SDK is invalid: test","reference":"ref00000000000000000000000000005"}'
SELECT t_authorize_err();
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"error","status":403,"code":"SDKVersionInvalid","message":"This SDK version is no longer supported.","reference":"ref00000000000000000000000000006"}'
SELECT t_authorize_err();
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"error","status":511,"code":"ServiceAuthorizationError","message":"Service authorization required","reference":"ref00000000000000000000000000007"}'
SELECT t_authorize_err();
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"error","status":418,"code":"Teapot","message":"I am a teapot"}'
SELECT t_authorize_err();
-- the API's text is repeated without control characters (no terminal escapes)
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"error","status":400,"code":"Weird\nCode","message":"line1\nline2 \u001b[31mred","reference":"ref00000000000000000000000000009"}'
SELECT t_authorize_err();
-- V103 the storage shape; X-Error-* headers when the body has no error
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"raw","status":400,"content_type":"application/json","body":"{\"error\":\"StorageErr\",\"message\":\"storage message\"}"}'
SELECT t_authorize_err();
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"raw","status":400,"body":"","headers":{"X-Error-Code":"ValidationErrors","X-Error-Message":"Parameter validation errors","X-Error-Reference":"ref00000000000000000000000000008"}}'
SELECT t_authorize_err();
-- malformed answers (V102, V105): no error code, HTML, empty, an array, non-JSON 2xx
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"raw","status":400,"content_type":"application/json","body":"{}"}'
SELECT t_authorize_err();
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"raw","status":502,"content_type":"text/html","body":"<html>Bad Gateway</html>"}'
SET digime.retry_limit = 0;
SELECT t_authorize_err();
RESET digime.retry_limit;
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"raw","status":404,"body":""}'
SELECT t_authorize_err();
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"raw","status":400,"content_type":"application/json","body":"[1]"}'
SELECT t_authorize_err();
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"raw","status":201,"content_type":"text/plain","body":"created"}'
SELECT t_authorize_err();
-- V87 no token, a token that is not a JWS, V88 no session
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"body","remove":["token"]}'
SELECT t_authorize_err();
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"body","patch":{"token":"not-a-jwt"}}'
SELECT t_authorize_err();
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"body","remove":["session"]}'
SELECT t_authorize_err();
-- verification of the answer's token (V80-V86, V89)
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"token","sign_with":"corrupt"}'
SELECT t_authorize_err();
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"token","sign_with":"unlisted"}'
SELECT t_authorize_err();
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"token","sign_with":"unlisted","kid":"sandbox-1"}'
SELECT t_authorize_err();
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"token","jku":"https://localhost:1/v1.7/jwks/oauth"}'
SELECT t_authorize_err();
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"token","omit_header":["jku"]}'
SELECT t_authorize_err();
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"token","alg":"RS512"}'
SELECT t_authorize_err();
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"token","salt":32}'
SELECT t_authorize_err();
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"token","salt":"max"}'
SELECT t_authorize_err();
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"token","exp":-60}'
SELECT t_authorize_err();
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"token","nbf":600}'
SELECT t_authorize_err();
\! test/sandbox/ctl POST faults '{"endpoint":"oauth/authorize","action":"token","exp":600}'
SELECT t_authorize_err();
SELECT count(*) AS recorded FROM digime.authorizations WHERE state = 'errors';
-- transport: nothing listens, the TLS certificate is not trusted, no CA file
SET digime.retry_limit = 0;
SET digime.base_url = 'https://127.0.0.1:1/v1.7/';
SELECT t_authorize_err();
RESET digime.base_url;
SET digime.ca_file = '';
SELECT t_authorize_err();
SET digime.ca_file = '/nonexistent/ca.pem';
SELECT t_authorize_err();
RESET digime.ca_file;
RESET digime.retry_limit;
SELECT t_authorize_err();
