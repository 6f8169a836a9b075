{{/* Names, labels and the shared model-repository volume of the ltrec chart. */}}

{{- define "ltrec.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ltrec.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ltrec.triton.fullname" -}}
{{- printf "%s-triton" (include "ltrec.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Model units. Each model version served runs as one unit: a Triton Deployment, a headless Service
that selects only that version's Triton pods, and a gateway Deployment whose LTREC_TRITON_URL is
that Service, so a gateway can never reach a Triton of another version. The primary unit serves
model.version (sized by triton/gateway replicaCount or their autoscalers); with canary.enabled a
second unit serves canary.version beside it with canary's replica counts, and the gateway
Service spreads callers over both by their ready gateway pods. Units are named by their version
("v" + the version in lower case, other characters as "-"), so swapping the two versions
(promotion) creates and deletes nothing: only replica counts change.
*/}}
{{- define "ltrec.slug" -}}
{{- printf "v%s" (regexReplaceAll "[^a-z0-9-]+" (lower .) "-") | trunc 31 | trimSuffix "-" }}
{{- end }}

{{- define "ltrec.units" -}}
{{- $units := list (dict "version" .Values.model.version "slug" (include "ltrec.slug" .Values.model.version) "primary" true "track" "primary" "tritonReplicas" .Values.triton.replicaCount "gatewayReplicas" .Values.gateway.replicaCount) }}
{{- with .Values.canary }}
{{- if .enabled }}
{{- $slug := include "ltrec.slug" .version }}
{{- if eq $slug (include "ltrec.slug" $.Values.model.version) }}
{{- fail (printf "canary.version %q must differ from model.version %q (in lower case, with other characters as '-')" .version $.Values.model.version) }}
{{- end }}
{{- $units = append $units (dict "version" .version "slug" $slug "primary" false "track" "canary" "tritonReplicas" .triton.replicaCount "gatewayReplicas" .gateway.replicaCount) }}
{{- end }}
{{- end }}
{{- toYaml $units }}
{{- end }}

{{/* Names of one unit's objects: include with (dict "ctx" $ "unit" $u). */}}
{{- define "ltrec.unit.triton" -}}
{{- printf "%s-triton-%s" (include "ltrec.fullname" .ctx | trunc 24 | trimSuffix "-") .unit.slug }}
{{- end }}

{{- define "ltrec.unit.gateway" -}}
{{- printf "%s-gateway-%s" (include "ltrec.fullname" .ctx | trunc 23 | trimSuffix "-") .unit.slug }}
{{- end }}

{{/* The unit's headless Service: one DNS record per ready Triton pod of its version. */}}
{{- define "ltrec.unit.tritonHeadless" -}}
{{- printf "%s-triton-%s" (include "ltrec.fullname" .ctx | trunc 24 | trimSuffix "-") .unit.slug }}
{{- end }}

{{/* The unit's gateways' gRPC target for Triton: every ready Triton pod of its version. */}}
{{- define "ltrec.unit.grpcTarget" -}}
{{- printf "dns:///%s.%s.svc:%v" (include "ltrec.unit.tritonHeadless" .) .ctx.Release.Namespace .ctx.Values.triton.ports.grpc }}
{{- end }}

{{/* Selector labels of one unit's pods of a component: (dict "ctx" $ "unit" $u "component" "triton"). */}}
{{- define "ltrec.unit.selectorLabels" -}}
{{ include "ltrec.selectorLabels" (dict "ctx" .ctx "component" .component) }}
ltrec.io/model-unit: {{ .unit.slug }}
{{- end }}

{{- define "ltrec.gateway.fullname" -}}
{{- printf "%s-gateway" (include "ltrec.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ltrec.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "ltrec.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ltrec
{{- end }}

{{/* Selector labels of one component: include with (dict "ctx" $ "component" "triton"). */}}
{{- define "ltrec.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ltrec.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "ltrec.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ltrec.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ltrec.image" -}}
{{- printf "%s:%s" .repository .tag }}
{{- end }}

{{/* Labels of one unit's pods: its version and track (primary or canary); the track changes at
a promotion, the version never (it names the unit). (dict "ctx" $ "unit" $u) */}}
{{- define "ltrec.unit.podLabels" -}}
ltrec.io/model-version: {{ .unit.version | quote }}
ltrec.io/track: {{ .unit.track }}
{{- end }}

{{- define "ltrec.modelAnnotations" -}}
ltrec.io/model-version: {{ .unit.version | quote }}
ltrec.io/model-source: {{ .ctx.Values.model.source | quote }}
{{- end }}

{{/*
The model repository volume of a unit: (dict "ctx" $ "unit" $u). source=pvc: an existing claim,
mounted read-only, whose subdirectory <pvc.root>/<version> is the unit's repository.
source=objectStore: an emptyDir that the "fetch-model" init container fills (one per pod: an
emptyDir is never shared between pods, so Triton and the gateway each download the bundle).
*/}}
{{- define "ltrec.modelVolume" -}}
{{- $m := .ctx.Values.model }}
- name: model-repository
{{- if eq $m.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ required "model.pvc.claimName is required when model.source is pvc" $m.pvc.claimName }}
    readOnly: true
{{- else }}
  emptyDir:
    {{- with $m.objectStore.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- end }}
{{- end }}

{{- define "ltrec.modelMount" -}}
{{- $m := .ctx.Values.model }}
- name: model-repository
  mountPath: {{ $m.mountPath }}
  {{- if eq $m.source "pvc" }}
  subPath: {{ printf "%s/%s" (trimSuffix "/" $m.pvc.root) .unit.version | trimPrefix "/" | quote }}
  {{- end }}
  readOnly: true
{{- end }}

{{- define "ltrec.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* (dict "ctx" $ "unit" $u): downloads the unit's version. bundleUrl is rendered with tpl
and .Values.model.version standing for the unit's version. */}}
{{- define "ltrec.fetchModelInitContainer" -}}
{{- $ctx := .ctx }}
{{- if eq $ctx.Values.model.source "objectStore" }}
{{- $os := $ctx.Values.model.objectStore }}
{{- $tplCtx := dict "Values" (dict "model" (dict "version" .unit.version)) "Release" $ctx.Release "Chart" $ctx.Chart "Template" $ctx.Template "Capabilities" $ctx.Capabilities }}
- name: fetch-model
  image: {{ include "ltrec.image" $os.image }}
  imagePullPolicy: {{ $os.image.pullPolicy }}
  command:
    {{- toYaml $os.command | nindent 4 }}
  env:
    - name: MODEL_VERSION
      value: {{ .unit.version | quote }}
    - name: MODEL_BUNDLE_URL
      value: {{ tpl $os.bundleUrl $tplCtx | quote }}
    - name: MODEL_DIR
      value: {{ $ctx.Values.model.mountPath | quote }}
    - name: HOME
      value: /tmp
    {{- with $os.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $os.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- include "ltrec.containerSecurityContext" $ctx | nindent 4 }}
  resources:
    {{- toYaml $os.resources | nindent 4 }}
  volumeMounts:
    - name: model-repository
      mountPath: {{ $ctx.Values.model.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end }}
