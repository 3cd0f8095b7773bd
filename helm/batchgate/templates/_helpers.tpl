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

{{- define "batchgate.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if eq .Values.image.variant "cpu" -}}{{- $tag = printf "%s-cpu" $tag -}}{{- end -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{/* Seconds the pod gets to stop: preStop sleep + batchgate's own grace period + a margin. */}}
{{- define "batchgate.terminationGrace" -}}
{{- if .Values.terminationGracePeriodSeconds -}}
{{- .Values.terminationGracePeriodSeconds -}}
{{- else -}}
{{- $server := (.Values.config | default dict).server | default dict -}}
{{- $exit := coalesce $server.exit_timeout_s $server.exit_timeout_secs 30 -}}
{{- add .Values.lifecycle.preStopSleepSeconds (ceil $exit | int) 10 -}}
{{- end -}}
{{- end -}}

{{/* The PromQL selector of this release's series (labels added by the ServiceMonitor/PodMonitor). */}}
{{- define "batchgate.promSelector" -}}
namespace="{{ .Release.Namespace }}",{{ if eq .Values.monitoring.kind "PodMonitor" }}pod=~"{{ include "batchgate.fullname" . }}-.*"{{ else }}service="{{ include "batchgate.fullname" . }}"{{ end }}
{{- end -}}
