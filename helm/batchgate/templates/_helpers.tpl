{{/* Names and labels shared by every template. */}}
{{- define "batchgate.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "batchgate.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The full name with a suffix ("-headless", "-tls"), the full name cut first so the whole stays
within 63 characters: cutting after appending would drop the suffix from a long release's name,
and the object would take the full name itself (a Service name over 63 is refused outright). */}}
{{- define "batchgate.suffixedName" -}}
{{- $ctx := index . 0 -}}
{{- $suffix := index . 1 -}}
{{- printf "%s%s" (include "batchgate.fullname" $ctx | trunc (int (sub 63 (len $suffix))) | trimSuffix "-") $suffix -}}
{{- end -}}

{{- define "batchgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "batchgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "batchgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "batchgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "batchgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "batchgate.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The server's image. With gpu.enabled it must be the GPU build: the CPU one (variant cpu,
whose tags end in -cpu, or the Dockerfile's own tag "cpu") has no CUDA and the CPU onnxruntime,
so the pod would hold a GPU it cannot use. */}}
{{- define "batchgate.image" -}}
{{- /* A tag YAML reads as a whole number (20261206) reaches the template as a float64, which
toString writes as 2.0261206e+07: written out in digits instead (the schema refuses a fraction). */}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- $tag = ternary (toString $tag) (printf "%.0f" (float64 $tag)) (kindIs "string" $tag) -}}
{{- $name := regexReplaceAll "@.*$" $tag "" -}}
{{- $digest := trimPrefix $name $tag -}}
{{- /* The CPU variant's tag ends in -cpu: added once (not to a tag that names the CPU build
already), and before a digest. */}}
{{- if and (eq .Values.image.variant "cpu") (ne $name "cpu") (not (hasSuffix "-cpu" $name)) -}}
{{- $name = printf "%s-cpu" $name -}}
{{- end -}}
{{- $image := printf "%s:%s%s" .Values.image.repository $name $digest -}}
{{- if and .Values.gpu.enabled (or (eq .Values.image.variant "cpu") (eq $name "cpu") (hasSuffix "-cpu" $name)) -}}
{{- fail (printf "gpu.enabled: the image %s is the CPU-only build (image.variant cpu, or an image.tag ending in -cpu), which cannot use the GPU the pod would be given: set image.variant gpu with the GPU build's tag, or turn gpu.enabled off" $image) -}}
{{- end -}}
{{- $image -}}
{{- end -}}

{{/* The value config as JSON, each section's keys in the one spelling batchgate reads: dashes as
underscores, and Triton's aliases (batchgate's config.ALIASES) as the names they stand for. The
server refuses a setting given twice in a section, and values.yaml already gives exit_timeout_s and
grpc_max_connection_age_s: a user's exit_timeout_secs (or exit-timeout-s) beside them would stop the
pods at start, so the user's other spelling replaces the default. Done before the chart checks the
keys it owns, which a dashed spelling would otherwise pass. */}}
{{- define "batchgate.config" -}}
{{- $aliases := dict "exit_timeout_secs" "exit_timeout_s" "grpc_max_connection_age_secs" "grpc_max_connection_age_s" "repository_poll_secs" "repository_poll_s" -}}
{{- $out := dict -}}
{{- range $section, $settings := (.Values.config | default dict) -}}
{{- if kindIs "map" $settings -}}
{{- $s := dict -}}
{{- range $pass := list "as written" "other spellings" -}}
{{- range $key, $value := $settings -}}
{{- $name := replace "-" "_" $key -}}
{{- $name = get $aliases $name | default $name -}}
{{- if eq (eq $name $key) (eq $pass "as written") -}}
{{- $_ := set $s $name $value -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $_ := set $out $section $s -}}
{{- else -}}
{{- $_ := set $out $section $settings -}}
{{- end -}}
{{- end -}}
{{- $out | toJson -}}
{{- end -}}

{{/* Seconds the pod gets to stop: preStop sleep + batchgate's own grace period + a margin. */}}
{{- define "batchgate.terminationGrace" -}}
{{- $server := (include "batchgate.config" . | fromJson).server | default dict -}}
{{- $exit := coalesce $server.exit_timeout_s 30 -}}
{{- $needed := add .Values.lifecycle.preStopSleepSeconds (ceil $exit | int) -}}
{{- with .Values.terminationGracePeriodSeconds -}}
{{- if le (int .) (int $needed) -}}
{{- fail (printf "terminationGracePeriodSeconds %v: must be longer than lifecycle.preStopSleepSeconds + config.server.exit_timeout_s (%d), or the kubelet kills the pod before it has drained; leave it empty to have it computed" . (int $needed)) -}}
{{- end -}}
{{- . -}}
{{- else -}}
{{- add $needed 10 -}}
{{- end -}}
{{- end -}}

{{/* The PromQL selector of this release's series (labels added by the ServiceMonitor/PodMonitor).
The operator labels a PodMonitor's series job="<namespace>/<its name>": this release's alone (a pod
name pattern would also take the pods of a release whose name starts with this one's). */}}
{{- define "batchgate.promSelector" -}}
namespace="{{ .Release.Namespace }}",{{ if eq .Values.monitoring.kind "PodMonitor" }}job="{{ .Release.Namespace }}/{{ include "batchgate.fullname" . }}"{{ else }}service="{{ include "batchgate.fullname" . }}"{{ end }}
{{- end -}}

{{/* The Secret that holds the API keys file: auth.apiKeys.existingSecret, or the chart's own
when auth.apiKeys.keys is given; empty: no keys (the server runs open). */}}
{{- define "batchgate.apiKeysSecret" -}}
{{- $k := .Values.auth.apiKeys -}}
{{- if and $k.existingSecret $k.keys -}}
{{- fail "auth.apiKeys: give existingSecret or keys, not both" -}}
{{- end -}}
{{- if $k.existingSecret -}}
{{- $k.existingSecret -}}
{{- else if $k.keys -}}
{{- include "batchgate.suffixedName" (list . "-api-keys") -}}
{{- end -}}
{{- end -}}

{{/* The kubernetes.io/tls Secret of the server's certificate; empty: TLS off. */}}
{{- define "batchgate.tlsSecret" -}}
{{- $t := .Values.tls -}}
{{- /* TLS settings without tls.enabled would leave the ports plaintext without a word. */ -}}
{{- if and (not $t.enabled) (or $t.existingSecret $t.clientAuth $t.clientCASecret $t.certManager.create) -}}
{{- fail "tls.existingSecret, tls.clientAuth, tls.clientCASecret or tls.certManager.create is set, but tls.enabled is false, so the HTTP and gRPC ports would serve plaintext: set tls.enabled true, or remove them" -}}
{{- end -}}
{{- if .Values.tls.enabled -}}
{{- if .Values.tls.existingSecret -}}
{{- .Values.tls.existingSecret -}}
{{- else if .Values.tls.certManager.create -}}
{{- include "batchgate.suffixedName" (list . "-tls") -}}
{{- else -}}
{{- fail "tls.enabled needs tls.existingSecret (a kubernetes.io/tls Secret: tls.crt, tls.key) or tls.certManager.create" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The plaintext health port the probes use when the main ports need TLS or a key; empty:
the probes use the main ports (and server.health_port is -1). */}}
{{- define "batchgate.healthPort" -}}
{{- if or .Values.tls.enabled (and .Values.auth.healthRequiresKey (include "batchgate.apiKeysSecret" .)) -}}
{{- .Values.ports.health -}}
{{- end -}}
{{- end -}}

{{/* Where the projected /etc/batchgate volume puts what the server reads. */}}
{{- define "batchgate.paths" -}}
{{- $d := "/etc/batchgate" -}}
{{- dict "config" (printf "%s/batchgate.yaml" $d) "keys" (printf "%s/keys/keys.yaml" $d) "cert" (printf "%s/tls/tls.crt" $d) "key" (printf "%s/tls/tls.key" $d) "clientCA" (printf "%s/tls/client-ca.crt" $d) "audit" "/var/log/batchgate/audit.log" "routes" "/etc/batchgate-routes/routes.yaml" "state" "/var/lib/batchgate" "driftProfiles" "/etc/batchgate-drift-profiles" "driftRebaselined" "/var/lib/batchgate/drift-profiles" "driftDeadLetter" "/var/lib/batchgate/drift-dead-letter.jsonl" | toJson -}}
{{- end -}}

{{/* The Service ports of the V2 HTTP and gRPC listeners. With TLS they are named https and grpcs,
both with appProtocol https (gRPC over TLS is HTTP/2 over TLS): a mesh passes them on as TLS. */}}
{{- define "batchgate.servicePorts" -}}
{{- $tls := .Values.tls.enabled -}}
- name: {{ ternary "https" "http" $tls }}
  port: {{ .Values.ports.http }}
  targetPort: http
  appProtocol: {{ ternary "https" "http" $tls }}
- name: {{ ternary "grpcs" "grpc" $tls }}
  port: {{ .Values.ports.grpc }}
  targetPort: grpc
  appProtocol: {{ ternary "https" "grpc" $tls }}
{{- end -}}

{{/* The ConfigMap holding routes.yaml: the chart's own when routes.list is given, else
routes.existingConfigMap; empty when there are no routes. */}}
{{- define "batchgate.routesConfigMap" -}}
{{- if .Values.routes.list -}}
{{- printf "%s-routes" (include "batchgate.fullname" .) -}}
{{- else -}}
{{- .Values.routes.existingConfigMap -}}
{{- end -}}
{{- end -}}

{{/* "true" when the pods mount the state volume at /var/lib/batchgate: state.enabled, and routes
(their runtime weights and rollout steps) or drift monitors (rebaselined profiles, undelivered
events) to keep there. */}}
{{- define "batchgate.stateVolume" -}}
{{- if and .Values.state.enabled (or (include "batchgate.routesConfigMap" .) .Values.drift.monitors) -}}
true
{{- end -}}
{{- end -}}

{{/* The ConfigMap of drift reference profiles: the chart's own when drift.profiles is given, else
drift.existingProfilesConfigMap; empty when there is none. */}}
{{- define "batchgate.driftProfilesConfigMap" -}}
{{- if and .Values.drift.profiles .Values.drift.existingProfilesConfigMap -}}
{{- fail "drift: give profiles or existingProfilesConfigMap, not both" -}}
{{- end -}}
{{- if .Values.drift.profiles -}}
{{- printf "%s-drift-profiles" (include "batchgate.fullname" .) -}}
{{- else -}}
{{- .Values.drift.existingProfilesConfigMap -}}
{{- end -}}
{{- end -}}

{{/* The claim that holds the model repository: pvc.existingClaim, or the chart's own with
pvc.create; empty when the pods mount none (source initContainer, or neither given). */}}
{{- define "batchgate.modelsClaim" -}}
{{- $pvc := .Values.modelRepository.pvc -}}
{{- if eq .Values.modelRepository.source "pvc" -}}
{{- if and $pvc.create $pvc.existingClaim -}}
{{- fail "modelRepository.pvc: give existingClaim or create, not both" -}}
{{- end -}}
{{- if $pvc.existingClaim -}}
{{- $pvc.existingClaim -}}
{{- else if $pvc.create -}}
{{- printf "%s-models" (include "batchgate.fullname" .) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* autoscaling.targetQueueDepth as a plain decimal (0.5, 8): the value may be a fraction or a
Kubernetes quantity ("500m"), which the HPA reads but KEDA's threshold and PromQL do not. */}}
{{- define "batchgate.queueTarget" -}}
{{- $t := .Values.autoscaling.targetQueueDepth -}}
{{- if and (kindIs "string" $t) (hasSuffix "m" $t) -}}
{{- round (divf (trimSuffix "m" $t) 1000.0) 9 -}}
{{- else -}}
{{- float64 $t -}}
{{- end -}}
{{- end -}}

{{/* A probe's timing from its probes.<name> values; timeoutSeconds only when given (the kubelet's
default is 1 s). */}}
{{- define "batchgate.probeTiming" -}}
periodSeconds: {{ .periodSeconds }}
failureThreshold: {{ .failureThreshold }}
{{- with .timeoutSeconds }}
timeoutSeconds: {{ . }}
{{- end }}
{{- end -}}

{{/* The settings the chart sets from its own values, by section: each with the value to use
instead. Refused in config (configmap.yaml) and as BATCHGATE_* variables in extraEnv (a variable
outranks the config file, so BATCHGATE_HTTP_PORT would move the listener off the port the probes,
the Service and the NetworkPolicy use). */}}
{{- define "batchgate.ownedSettings" -}}
{{- dict "auth" (dict "api_keys_file" "auth.apiKeys" "allow_open_admin" "auth.allowOpenAdmin" "health_requires_key" "auth.healthRequiresKey" "metrics_requires_key" "auth.metricsRequiresKey" "audit_log_file" "auth.auditLog") "tls" (dict "tls_cert_file" "tls.existingSecret" "tls_key_file" "tls.existingSecret" "tls_client_ca_file" "tls.clientAuth") "server" (dict "host" "bindAddress" "http_port" "ports.http" "grpc_port" "ports.grpc" "metrics_port" "ports.metrics" "admin_host" "admin.expose" "admin_port" "admin.port" "admin_http_port" "admin.httpPort" "health_port" "ports.health" "workers" "workers" "workers_mode" "workersMode") "repository" (dict "model_repository" "modelRepository (mounted at /models)") "routing" (dict "routes_file" "routes.list" "state_dir" "state.enabled") "shared_memory" (dict "shm_key_prefix" "sharedMemory.keyPrefix" "shm_max_regions" "sharedMemory.maxRegions" "shm_max_bytes" "sharedMemory.maxBytes") "observability" (dict "latency_slo_ms" "slo.latency.thresholdSeconds") | toJson -}}
{{- end -}}
