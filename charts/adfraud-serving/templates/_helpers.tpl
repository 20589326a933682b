{{/*
Helpers of the adfraud-serving chart. Every name is "adfraud-serving.<name>".
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "adfraud-serving.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The full resource name: fullnameOverride, or "<release>-<name>" (just the release when it
already contains the name). */}}
{{- define "adfraud-serving.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "adfraud-serving.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<chart>-<version>" for the helm.sh/chart label. */}}
{{- define "adfraud-serving.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select the pods; never change them on a live release. */}}
{{- define "adfraud-serving.selectorLabels" -}}
app.kubernetes.io/name: {{ include "adfraud-serving.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "adfraud-serving.labels" -}}
helm.sh/chart: {{ include "adfraud-serving.chart" . }}
{{ include "adfraud-serving.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: serving
app.kubernetes.io/part-of: adfraud
{{- end -}}

{{/* The service account the pods run as. */}}
{{- define "adfraud-serving.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "adfraud-serving.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The image reference; an empty tag means appVersion, with "-tensorrt" for that backend. */}}
{{- define "adfraud-serving.image" -}}
{{- $tag := .Values.image.tag -}}
{{- if not $tag -}}
{{- $tag = .Chart.AppVersion -}}
{{- if eq .Values.serving.backend "tensorrt" -}}
{{- $tag = printf "%s-tensorrt" $tag -}}
{{- end -}}
{{- end -}}
{{- printf "%s/%s:%s" (trimSuffix "/" .Values.image.registry) .Values.image.repository $tag -}}
{{- end -}}

{{/* Where the server reads its configuration: the mounted ConfigMap or modelConfig.uri. */}}
{{- define "adfraud-serving.configPath" -}}
{{- if .Values.modelConfig.configMap.enabled -}}
{{- printf "%s/current.json" (trimSuffix "/" .Values.modelConfig.configMap.mountPath) -}}
{{- else -}}
{{- required "modelConfig.uri is required when modelConfig.configMap.enabled is false" .Values.modelConfig.uri -}}
{{- end -}}
{{- end -}}

{{/* PromQL label matchers of this release's serving series, for the alert rules. */}}
{{- define "adfraud-serving.metricSelector" -}}
{{- if .Values.prometheusRule.selector -}}
{{- .Values.prometheusRule.selector -}}
{{- else -}}
{{- printf "namespace=%q,job=%q" .Release.Namespace (include "adfraud-serving.fullname" .) -}}
{{- end -}}
{{- end -}}
